"""The trainer's export, loaded by our ComfyUI loader node, patches a real ComfyUI UNet
to give the training model's noise prediction."""
from types import SimpleNamespace

import pytest
import torch

from devtools.comfy_inprocess import build_sd15_model_patcher, diffusers_unet_from_comfy, noise_prediction, pack_module
from ipadapter.checkpoint import load_adapter
from training.adapter import IPAdapterModel
from training.checkpointing import export_adapter
from training.variants import adapter_spec

WIDTH = 64
EMBED_DIM, HIDDEN_WIDTH, HIDDEN_TOKENS = 1024, 1280, 257  # ViT-H/14: pooled embedding, penultimate hidden states


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_export_loads_in_the_comfyui_loader_node_and_gives_the_training_models_output(comfy, tmp_path, variant):
    check_export_in_comfyui(comfy, tmp_path, variant)


def check_export_in_comfyui(comfy, tmp_path, variant: str) -> None:
    """Export a trained-looking ``variant`` adapter, load it with IPAdapterKitLoader, encode the image prompt with
    nodes.encode_images (a stand-in encoder; the unconditional input is the nodes' own choice), patch a ComfyUI
    UNet and compare its ε, conditional and unconditional rows, with the training model's forward."""
    import comfy.utils  # noqa: F401
    import folder_paths

    nodes = pack_module("nodes")
    patcher_module = pack_module("patcher")
    image_prompt = pack_module("ipadapter.image_prompt")
    patcher = build_sd15_model_patcher(WIDTH, seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = diffusers_unet_from_comfy(comfy, patcher, WIDTH)
        spec = adapter_spec(variant, None, EMBED_DIM, HIDDEN_WIDTH, unet)
        training_model = IPAdapterModel(unet, spec=spec).eval()
    with torch.no_grad():  # trained-looking weights
        for parameter in training_model.trainable_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    name = f"trained_{variant}.safetensors"
    export_adapter(training_model, tmp_path / name, 10, "config: test", dtype="fp32", variant=variant)
    exported = load_adapter(tmp_path / name, base_width=None)
    assert (exported.spec.variant, exported.spec.num_tokens) == (variant, spec.num_tokens)

    folder_paths.add_model_folder_path(nodes.MODEL_FOLDER, str(tmp_path))
    (adapter,) = nodes.IPAdapterKitLoader().load(name)
    assert adapter.checkpoint.spec.variant == variant
    # the encoder's outputs: the reference image's, and for plus the hidden states of a blank image
    image_embeds = torch.randn(1, EMBED_DIM, generator=generator) * 3
    penultimate = torch.randn(1, HIDDEN_TOKENS, HIDDEN_WIDTH, generator=generator)
    blank_penultimate = torch.randn(1, HIDDEN_TOKENS, HIDDEN_WIDTH, generator=generator)
    encoder = SimpleNamespace(encode=lambda image, crop: (image_embeds, penultimate),
                              blank_penultimate=lambda: blank_penultimate, encoder=SimpleNamespace(name="stand-in ViT-H/14"))
    images = nodes.encode_images(encoder, torch.zeros(1, 224, 224, 3), "crop")
    cond, uncond = image_prompt.image_tokens(adapter.checkpoint, adapter.projection, images, images.uncond_penultimate)
    assert cond.shape == uncond.shape == (1, spec.num_tokens, 768)
    term = patcher_module.ImagePromptTerm.build(adapter.checkpoint, cond, uncond, 1.0, {}, 1e9, 0.0)
    patched = patcher_module.apply_image_prompt(patcher, term)

    latent = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    t = 400
    sigma = patcher.model.model_sampling.sigmas[t].expand(2).clone()
    from_comfy = noise_prediction(patched, latent, sigma, context, cond_or_uncond=(0, 1))

    # the training model: the conditional sample gets the image; the unconditional one, as the reference
    # implementation, a zero embedding (base) or the hidden states of a blank image (plus)
    scaled = latent / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5
    if variant == "base":
        features = torch.cat([image_embeds, torch.zeros_like(image_embeds)])
    else:
        features = torch.cat([penultimate, blank_penultimate])
    with torch.no_grad():
        from_training = training_model(scaled, torch.tensor([t, t]), context, features)
        text_only = training_model(scaled, torch.tensor([t, t]), context, features, scale=0.0)
    relative = (from_comfy - from_training).norm() / from_training.norm()
    assert relative <= 1e-4, relative
    for row in (0, 1):  # the image prompt matters in both rows, so a wrong image input in either would show
        assert (from_training[row] - text_only[row]).norm() / from_training[row].norm() > 1e-2, row
