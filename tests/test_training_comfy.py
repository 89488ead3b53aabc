"""The trainer's export, loaded by our ComfyUI loader node, patches a real ComfyUI UNet
to give the training model's noise prediction: SD1.5 and SDXL, base and plus."""
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from devtools.comfy_inprocess import build_sd15_model_patcher, diffusers_unet_from_comfy, noise_prediction, pack_module
from devtools.sdxl_models import (
    POOLED_WIDTH,
    build_sdxl_model_patcher,
    diffusers_sdxl_unet_from_comfy,
    sdxl_added_conditioning,
    sdxl_time_ids,
)
from ipadapter.adapter_file import load_adapter
from training.adapter import IPAdapterModel
from training.run_files import export_adapter
from training.variants import adapter_spec
from ipadapter.weighting import layer_weights

WIDTH = 64  # model_channels of the scaled-down UNets
EMBED_DIM, HIDDEN_WIDTH, HIDDEN_TOKENS = 1024, 1280, 257  # ViT-H/14: pooled embedding, penultimate hidden states
LATENT = 8  # latent side; 64 x 64 pixels


@dataclass(frozen=True)
class Family:
    """A model family as this test needs it: a real ComfyUI UNet, the same weights in diffusers, the text width,
    and whether the UNet takes SDXL's added conditioning (ComfyUI's ``y``, diffusers' ``added_cond_kwargs``)."""

    build_patcher: Callable
    diffusers_unet: Callable
    context_dim: int
    added_conditioning: bool


FAMILIES = {
    "sd15": Family(build_sd15_model_patcher, diffusers_unet_from_comfy, 768, False),
    "sdxl": Family(build_sdxl_model_patcher, diffusers_sdxl_unet_from_comfy, 2048, True),
}


@pytest.mark.parametrize("variant", ["base", "plus"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_in_the_comfyui_loader_node_and_gives_the_training_models_output(comfy, tmp_path, family, variant):
    check_export_in_comfyui(comfy, tmp_path, variant, family)


def check_export_in_comfyui(comfy, tmp_path, variant: str, family: str = "sd15") -> None:
    """Export a trained-looking ``variant`` adapter for ``family``, load it with IPAdapterKitLoader, encode the image
    prompt with nodes.encode_images (a stand-in encoder; the unconditional input is the nodes' own choice), patch a
    ComfyUI UNet and compare its ε, conditional and unconditional rows, with the training model's forward (for SDXL
    both sides get the same pooled text and size conditioning)."""
    import comfy.utils  # noqa: F401
    import folder_paths

    setup = FAMILIES[family]
    nodes = pack_module("nodes")
    patcher_module = pack_module("patcher")
    image_prompt = pack_module("ipadapter.image_prompt")
    patcher = setup.build_patcher(WIDTH, seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = setup.diffusers_unet(comfy, patcher, WIDTH)
        spec = adapter_spec(variant, None, EMBED_DIM, HIDDEN_WIDTH, unet)
        training_model = IPAdapterModel(unet, spec=spec).eval()
    assert spec.architecture.id == family
    with torch.no_grad():  # trained-looking weights
        for parameter in training_model.trainable_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    name = f"trained_{family}_{variant}.safetensors"
    export_adapter(training_model, tmp_path / name, 10, "config: test", dtype="fp32", variant=variant)
    exported = load_adapter(tmp_path / name, base_width=None)
    assert (exported.spec.architecture.id, exported.spec.variant, exported.spec.num_tokens) == (family, variant, spec.num_tokens)
    assert exported.spec.resampler == spec.resampler  # plus: SD1.5's width 768, 12 heads; SDXL's 1280, 20 heads

    folder_paths.add_model_folder_path(nodes.MODEL_FOLDER, str(tmp_path))
    (adapter,) = nodes.IPAdapterKitLoader().load(name)
    assert (adapter.checkpoint.spec.architecture.id, adapter.checkpoint.spec.variant) == (family, variant)
    # the encoder's outputs: the reference image's, and for plus the hidden states of a blank image
    image_embeds = torch.randn(1, EMBED_DIM, generator=generator) * 3
    penultimate = torch.randn(1, HIDDEN_TOKENS, HIDDEN_WIDTH, generator=generator)
    blank_penultimate = torch.randn(1, HIDDEN_TOKENS, HIDDEN_WIDTH, generator=generator)
    encoder = SimpleNamespace(encode=lambda image, crop: (image_embeds, penultimate),
                              blank_penultimate=lambda: blank_penultimate, encoder=SimpleNamespace(name="stand-in ViT-H/14"))
    images = nodes.encode_images(encoder, torch.zeros(1, 224, 224, 3), "crop")
    cond, uncond = image_prompt.image_tokens(adapter.checkpoint, adapter.projection, images, images.uncond_penultimate)
    assert cond.shape == uncond.shape == (1, spec.num_tokens, setup.context_dim)
    term = patcher_module.ImagePromptTerm.build(adapter.checkpoint, cond, uncond, layer_weights(adapter.checkpoint.spec.architecture, 1.0), 1e9, 0.0)
    patched = patcher_module.apply_image_prompt(patcher, term)

    latent = torch.randn(2, 4, LATENT, LATENT, generator=generator)
    context = torch.randn(2, 77, setup.context_dim, generator=generator)
    comfy_conditioning, added_cond = {}, None
    if setup.added_conditioning:  # the same pooled text and sizes on both sides
        pooled = torch.randn(2, POOLED_WIDTH, generator=generator)
        pixels = 8 * LATENT
        comfy_conditioning["y"] = sdxl_added_conditioning(patcher.model, pooled, pixels, pixels)
        added_cond = {"text_embeds": pooled, "time_ids": sdxl_time_ids(pixels, pixels, 2)}
    t = 400
    sigma = patcher.model.model_sampling.sigmas[t].expand(2).clone()
    from_comfy = noise_prediction(patched, latent, sigma, context, cond_or_uncond=(0, 1), **comfy_conditioning)

    # the training model: the conditional sample gets the image; the unconditional one, as the reference
    # implementation, a zero embedding (base) or the hidden states of a blank image (plus)
    scaled = latent / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5
    if variant == "base":
        features = torch.cat([image_embeds, torch.zeros_like(image_embeds)])
    else:
        features = torch.cat([penultimate, blank_penultimate])
    with torch.no_grad():
        from_training = training_model(scaled, torch.tensor([t, t]), context, features, added_cond=added_cond)
        text_only = training_model(scaled, torch.tensor([t, t]), context, features, scale=0.0, added_cond=added_cond)
    relative = (from_comfy - from_training).norm() / from_training.norm()
    assert relative <= 1e-4, relative
    for row in (0, 1):  # the image prompt matters in both rows, so a wrong image input in either would show
        assert (from_training[row] - text_only[row]).norm() / from_training[row].norm() > 1e-2, row
