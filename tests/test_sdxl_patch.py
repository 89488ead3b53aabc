"""SDXL in ComfyUI: parity with diffusers, the node's refusals, and the full-size UNet's 70 layers.

The guarantees every family shares (λ = 0, step window, stacking, foreign
patches, cond/uncond, masks) are tested for SDXL in test_comfy_patch.py.
"""
import copy
import gc
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from devtools.adapter_factory import random_adapter
from devtools.comfy_inprocess import UNetInputs, build_sd15_model_patcher, pack_module, random_unet_inputs, sigma_at
from devtools.sdxl_models import (
    POOLED_WIDTH,
    build_sdxl_model_patcher,
    build_sdxl_refiner_patcher,
    diffusers_sdxl_unet_from_comfy,
    sdxl_added_conditioning,
    sdxl_refiner_unet_config,
    sdxl_time_ids,
    sdxl_unet_config,
)
from ipadapter.weighting import layer_weights

pytestmark = pytest.mark.comfyui_2024

WIDTH = 64  # model_channels of the scaled-down UNets
CONTEXT = 2048


@pytest.fixture(scope="module")
def sdxl(comfy):
    return build_sdxl_model_patcher(WIDTH, seed=3)


@pytest.fixture(scope="module")
def diffusers_sdxl(comfy, sdxl):
    import comfy.utils  # noqa: F401

    return diffusers_sdxl_unet_from_comfy(comfy, sdxl, WIDTH)


def test_configs_are_comfyuis_own(comfy):
    assert comfy.supported_models.SDXL.matches(sdxl_unet_config(320))
    assert comfy.supported_models.SDXLRefiner.matches(sdxl_refiner_unet_config(384))
    assert not comfy.supported_models.SDXL.matches(sdxl_refiner_unet_config(384))


def test_scaled_down_unet_has_the_seventy_sdxl_layers(sdxl):
    patcher_module = pack_module("patcher")
    architecture = patcher_module.family_of_comfy_model(sdxl.model.diffusion_model)
    assert architecture.id == "sdxl" and len(architecture.layers) == 70
    modules = patcher_module.cross_attention_modules(sdxl.model.diffusion_model, architecture)
    widths = {key: module.to_q.weight.shape[0] for key, module in modules.items()}
    assert widths == architecture.layer_widths(WIDTH)
    assert all(module.to_k.weight.shape[1] == CONTEXT for module in modules.values())


# --- parity with diffusers ------------------------------------------------------

# (variant, encoder input width): the released SDXL adapters' image inputs
ADAPTERS = {
    "ip-adapter_sdxl_vit-h (base, ViT-H embeds)": ("base", 1024),
    "ip-adapter_sdxl (base, bigG embeds)": ("base", 1280),
    "ip-adapter-plus_sdxl_vit-h (plus, ViT-H hidden states)": ("plus", 1280),
}


def encoder_features(variant: str, encoder_width: int, generator):
    """EncodedImages of one reference, and diffusers' image_embeds [cond, uncond] for the same input."""
    image_prompt = pack_module("ipadapter.image_prompt")
    if variant == "base":
        embeds = torch.randn(1, encoder_width, generator=generator) * 3
        images = image_prompt.EncodedImages(embeds, torch.zeros(1, 257, 1280))  # uncond: a zero embedding
        return images, torch.stack([embeds, torch.zeros_like(embeds)])  # [batch, images, width]
    hidden = torch.randn(1, 257, encoder_width, generator=generator)
    blank = torch.randn(1, 257, encoder_width, generator=generator)  # stands for the blank image's hidden states
    images = image_prompt.EncodedImages(torch.zeros(1, 1024), hidden, uncond_penultimate=blank)
    return images, torch.stack([hidden, blank])  # [batch, images, tokens, width]


def sdxl_batch(model, generator, size=8):
    latent = torch.randn(2, 4, size, size, generator=generator)
    context = torch.randn(2, 77, CONTEXT, generator=generator)
    pooled = torch.randn(2, POOLED_WIDTH, generator=generator)
    return UNetInputs(latent, context, sdxl_added_conditioning(model.model, pooled, 8 * size, 8 * size)), pooled


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_patched_sdxl_matches_diffusers_load_ip_adapter(sdxl, diffusers_sdxl, adapter):
    variant, encoder_width = ADAPTERS[adapter]
    weight, t = 0.7, 400
    patcher_module = pack_module("patcher")
    image_prompt = pack_module("ipadapter.image_prompt")
    nested = random_adapter(variant, base_width=WIDTH, encoder_width=encoder_width, seed=4, family="sdxl")

    unet = copy.deepcopy(diffusers_sdxl)
    unet._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    for processor in unet.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [weight]

    checkpoint = pack_module("ipadapter.adapter_file").IPAdapterCheckpoint.from_state_dicts(**nested, base_width=None)
    generator = torch.Generator().manual_seed(5)
    images, diffusers_embeds = encoder_features(variant, encoder_width, generator)
    cond, uncond = image_prompt.image_tokens(checkpoint, checkpoint.build_projection(), images, None)
    patched = patcher_module.apply_image_prompt(sdxl, patcher_module.ImagePromptTerm.build(checkpoint, cond, uncond, layer_weights(checkpoint.spec.architecture, weight), 1e9, 0.0))

    inputs, pooled = sdxl_batch(sdxl, generator)
    sigma = sigma_at(sdxl, t)
    ours = inputs.predict(patched, sigma, cond_or_uncond=(0, 1))  # row 0 conditional, row 1 unconditional
    scaled = inputs.latent / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5
    added = {"image_embeds": [diffusers_embeds], "text_embeds": pooled, "time_ids": sdxl_time_ids(64, 64, 2)}
    with torch.no_grad():
        theirs = unet(scaled, torch.tensor([t, t]), encoder_hidden_states=inputs.context, added_cond_kwargs=added).sample

    relative = (ours - theirs).norm() / theirs.norm()
    assert relative <= 1e-4, relative
    plain = inputs.predict(sdxl, sigma)
    assert (ours - plain).norm() / plain.norm() > 1e-2  # the image prompt matters here


# --- the node's one-line refusals ---------------------------------------------------


@pytest.fixture(scope="module")
def nodes(comfy):
    return pack_module("nodes")


def loaded_adapter(nodes, source, **adapter):
    checkpoint = pack_module("ipadapter.adapter_file").IPAdapterCheckpoint.from_state_dicts(
        **random_adapter(**adapter), source=source, base_width=None)
    return nodes.LoadedAdapter(checkpoint, checkpoint.build_projection())


def vit_h_embeds():
    image_prompt = pack_module("ipadapter.image_prompt")
    return image_prompt.EncodedImages(torch.randn(1, 1024), torch.randn(1, 257, 1280), encoder_name="OpenCLIP ViT-H/14")


def apply_node(nodes, model, adapter, embeds, layers="all"):
    return nodes.IPAdapterKitApply().apply(model, adapter, 1.0, 0.0, 1.0, "average", layers, "", embeds=embeds)


def refusal(call) -> str:
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    return message


def test_apply_node_patches_an_sdxl_model(nodes, sdxl):
    adapter = loaded_adapter(nodes, "ip-adapter_sdxl_vit-h.safetensors", family="sdxl", base_width=WIDTH)
    (patched,) = apply_node(nodes, sdxl, adapter, vit_h_embeds(), layers="style")
    attn2 = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert len(attn2) == 70
    term = attn2[("middle", 0, 9)].terms[0]
    assert [key for key in range(1, 140, 2) if term.layer_weight(key)] == list(range(69, 88, 2))  # up_blocks.0.attentions.1
    assert "patches_replace" not in sdxl.model_options["transformer_options"]


def test_an_sd15_adapter_on_sdxl_is_refused(nodes, sdxl):
    adapter = loaded_adapter(nodes, "ip-adapter_sd15.safetensors", family="sd15", base_width=WIDTH)
    message = refusal(lambda: apply_node(nodes, sdxl, adapter, vit_h_embeds()))
    assert "'ip-adapter_sd15.safetensors' is an SD1.5 adapter, but the MODEL is SDXL (70 cross-attention layers" in message
    assert "context width 2048); expected an SDXL adapter" in message


def test_an_sdxl_adapter_on_sd15_is_refused(nodes, comfy):
    adapter = loaded_adapter(nodes, "ip-adapter_sdxl_vit-h.safetensors", family="sdxl", base_width=WIDTH)
    message = refusal(lambda: apply_node(nodes, build_sd15_model_patcher(WIDTH), adapter, vit_h_embeds()))
    assert "'ip-adapter_sdxl_vit-h.safetensors' is an SDXL adapter, but the MODEL is SD1.5 (16 cross-attention layers" in message
    assert "context width 768); expected an SD1.5 adapter" in message


def test_a_bigg_adapter_with_vit_h_embeds_is_refused(nodes, sdxl):
    adapter = loaded_adapter(nodes, "ip-adapter_sdxl.safetensors", family="sdxl", base_width=WIDTH, encoder_width=1280)
    message = refusal(lambda: apply_node(nodes, sdxl, adapter, vit_h_embeds()))
    assert message == ("'ip-adapter_sdxl.safetensors' expects OpenCLIP ViT-bigG/14 image embeddings of width 1280, "
                       "but the image encoder (OpenCLIP ViT-H/14) gives 1024")


def test_an_sdxl_refiner_is_refused(nodes, comfy):
    adapter = loaded_adapter(nodes, "ip-adapter_sdxl_vit-h.safetensors", family="sdxl", base_width=WIDTH)
    refiner = build_sdxl_refiner_patcher(WIDTH)
    message = refusal(lambda: apply_node(nodes, refiner, adapter, vit_h_embeds()))
    # 16 input + 4 middle + 24 output layers
    assert "the MODEL's UNet has 44 cross-attention layers with context width 1280; expected SD1.5 or SDXL" in message
    assert "SDXL refiner" in message


def test_an_sdxl_adapter_of_another_width_is_refused(nodes, sdxl):
    adapter = loaded_adapter(nodes, "tiny_sdxl.safetensors", family="sdxl", base_width=32)
    message = refusal(lambda: apply_node(nodes, sdxl, adapter, vit_h_embeds()))
    assert message == "the MODEL's UNet starts 64 channels wide; 'tiny_sdxl.safetensors' was made for 32 (SDXL is 320)"


# --- full size --------------------------------------------------------------------------


IN_OWN_PROCESS = "IPADAPTER_FULL_SDXL_IN_THIS_PROCESS"


@pytest.mark.slow
def test_full_size_sdxl_runs_in_a_process_of_its_own():
    """The full-size check below, in a child pytest: its ~9 GB are the OS's again when it exits,
    instead of staying in the test process's heap for the rest of the suite."""
    here = Path(__file__)
    env = {**os.environ, IN_OWN_PROCESS: "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow",
                          f"{here}::test_full_size_sdxl_unet_runs_all_seventy_patches_and_weight_zero_is_exact"],
                         cwd=here.parent, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(IN_OWN_PROCESS), reason="runs in its own process (the test above)")
def test_full_size_sdxl_unet_runs_all_seventy_patches_and_weight_zero_is_exact(comfy):
    """The real SDXL UNet (320 channels, 2.6 B parameters, bf16), one 8 x 8 latent step: ~30 s, ~9 GB peak."""
    model = build_sdxl_model_patcher(320, seed=0, dtype=torch.bfloat16)
    try:
        check_full_size_patches(pack_module("patcher"), model)
    finally:
        model.model.diffusion_model = None  # clones (and a failure's traceback) keep the BaseModel: drop its 5 GB UNet
        del model
        gc.collect()


def check_full_size_patches(patcher_module, model):
    architecture = patcher_module.family_of_comfy_model(model.model.diffusion_model)
    checkpoint = pack_module("ipadapter.adapter_file").IPAdapterCheckpoint.from_state_dicts(
        **random_adapter("base", family="sdxl", seed=1, dtype=torch.bfloat16), source="ip-adapter_sdxl_vit-h.bin")
    assert patcher_module.check_model_fits(model.model.diffusion_model, checkpoint) is architecture
    generator = torch.Generator().manual_seed(2)
    cond, uncond = (torch.randn(1, 4, CONTEXT, generator=generator) for _ in range(2))

    def apply(to, weight):
        return patcher_module.apply_image_prompt(to, patcher_module.ImagePromptTerm.build(checkpoint, cond, uncond, layer_weights(checkpoint.spec.architecture, weight), 1e9, 0.0))

    seen = Counter()

    def recorder(q, k, v, extra_options):  # a foreign attn2 patch under ours: plain attention, counted
        from comfy.ldm.modules.attention import optimized_attention

        seen[(*extra_options["block"], extra_options["block_index"])] += 1
        return optimized_attention(q, k, v, extra_options["n_heads"])

    recorded = model.clone()
    for layer in architecture.layers:
        recorded.set_model_attn2_replace(recorder, *layer.comfy_patch_key)

    inputs = random_unet_inputs(model, CONTEXT, batch=2)
    sigma = sigma_at(model)
    plain = inputs.predict(model, sigma)
    assert torch.equal(inputs.predict(apply(model, 0.0), sigma), plain)
    patched = apply(recorded, 1.0)
    attn2 = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert set(attn2) == {layer.comfy_patch_key for layer in architecture.layers}
    assert all(isinstance(patch, patcher_module.AttentionPatch) and patch.previous is recorder for patch in attn2.values())
    with_image = inputs.predict(patched, sigma)
    # the recorder is reached only through our patches: each of the 70 ran once
    assert seen == Counter({layer.comfy_patch_key: 1 for layer in architecture.layers})
    assert torch.isfinite(with_image).all() and (with_image - plain).abs().max() > 1e-2
