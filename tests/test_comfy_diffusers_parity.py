"""The same UNet weights and adapter give the same noise prediction in ComfyUI and diffusers."""
import pytest
import torch

from devtools.adapter_factory import random_adapter
from devtools.comfy_inprocess import build_sd15_model_patcher, diffusers_unet_from_comfy, noise_prediction, pack_module
from ipadapter.adapter_file import IPAdapterCheckpoint
from ipadapter.weighting import layer_weights

WIDTH = 64


@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_patched_comfy_model_matches_diffusers_load_ip_adapter(comfy, weight):
    import comfy.utils  # noqa: F401

    patcher_module = pack_module("patcher")
    image_prompt = pack_module("ipadapter.image_prompt")
    model = build_sd15_model_patcher(WIDTH, seed=3)
    unet = diffusers_unet_from_comfy(comfy, model, WIDTH)

    nested = random_adapter("base", base_width=WIDTH, seed=4)
    unet._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    for processor in unet.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [weight]

    checkpoint = IPAdapterCheckpoint.from_state_dicts(**nested, base_width=None)
    projection = checkpoint.build_projection()
    generator = torch.Generator().manual_seed(5)
    image_embeds = torch.randn(1, 1024, generator=generator) * 3
    images = image_prompt.EncodedImages(image_embeds, torch.zeros(1, 257, 1280))
    cond, uncond = image_prompt.image_tokens(checkpoint, projection, images, None)
    term = patcher_module.ImagePromptTerm.build(checkpoint, cond, uncond, layer_weights(checkpoint.spec.architecture, weight), 1e9, 0.0)
    patched = patcher_module.apply_image_prompt(model, term)

    latent = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    t = 400
    sigma = model.model.model_sampling.sigmas[t].expand(2).clone()
    ours = noise_prediction(patched, latent, sigma, context, cond_or_uncond=(0, 1))

    # diffusers: the conditional sample gets the image, the unconditional one a zero embedding
    scaled = latent / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5
    embeds = torch.stack([image_embeds, torch.zeros_like(image_embeds)])  # [batch, images, 1024]
    with torch.no_grad():
        theirs = unet(scaled, torch.tensor([t, t]), encoder_hidden_states=context,
                      added_cond_kwargs={"image_embeds": [embeds]}).sample
        without = unet(scaled, torch.tensor([t, t]), encoder_hidden_states=context,
                       added_cond_kwargs={"image_embeds": [torch.zeros_like(embeds)]}).sample

    relative = (ours - theirs).norm() / theirs.norm()
    assert relative <= 1e-4, relative
    assert (theirs - without).norm() / theirs.norm() > 1e-2  # the image prompt matters here
