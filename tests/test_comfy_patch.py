"""The attn2 patches inside a real ComfyUI UNet (SD1.5 layout, scaled down)."""
import copy

import pytest
import torch

from adapter_factory import random_adapter
from comfy_inprocess import build_sd15_model_patcher, noise_prediction, pack_module
from ipadapter.checkpoint import IPAdapterCheckpoint

WIDTH = 64  # model_channels of the scaled-down UNet


@pytest.fixture(scope="module")
def patcher_module(comfy):
    return pack_module("patcher")


@pytest.fixture(scope="module")
def model(comfy):
    return build_sd15_model_patcher(WIDTH)


@pytest.fixture(scope="module")
def checkpoint():
    return IPAdapterCheckpoint.from_state_dicts(**random_adapter("base", base_width=WIDTH, seed=1), base_width=None)


def make_term(patcher_module, checkpoint, weight=1.0, sigma_start=1e9, sigma_end=0.0, mask=None, seed=0, layers=None):
    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, 4, 768, generator=generator)
    uncond = torch.randn(1, 4, 768, generator=generator)
    layer_weights = layers or {k: 1.0 for k in range(1, 32, 2)}
    return patcher_module.ImagePromptTerm.build(checkpoint, cond, uncond, weight, layer_weights, sigma_start, sigma_end, mask)


def inputs(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 4, 8, 8, generator=generator)
    context = torch.randn(batch, 77, 768, generator=generator)
    return latent, context


def sigma_of(model, batch=2, t=500):
    return model.model.model_sampling.sigmas[t].expand(batch).clone()


def test_weight_zero_is_exactly_the_unpatched_model(patcher_module, model, checkpoint):
    latent, context = inputs()
    sigma = sigma_of(model)
    plain = noise_prediction(model, latent, sigma, context)
    patched = patcher_module.apply_image_prompt(model, make_term(patcher_module, checkpoint, weight=0.0))
    assert torch.equal(noise_prediction(patched, latent, sigma, context), plain)
    active = patcher_module.apply_image_prompt(model, make_term(patcher_module, checkpoint, weight=1.0))
    assert (noise_prediction(active, latent, sigma, context) - plain).abs().max() > 1e-3


def test_outside_the_step_window_is_exactly_the_unpatched_model(patcher_module, model, checkpoint):
    latent, context = inputs()
    sampling = model.model.model_sampling
    term = make_term(patcher_module, checkpoint, sigma_start=sampling.percent_to_sigma(0.5), sigma_end=sampling.percent_to_sigma(1.0))
    patched = patcher_module.apply_image_prompt(model, term)
    early, late = sigma_of(model, t=900), sigma_of(model, t=100)
    assert torch.equal(noise_prediction(patched, latent, early, context), noise_prediction(model, latent, early, context))
    assert not torch.equal(noise_prediction(patched, latent, late, context), noise_prediction(model, latent, late, context))


def test_all_sixteen_layers_patched_and_a_foreign_patch_is_called_through(patcher_module, model, checkpoint):
    seen = []

    def foreign(q, k, v, extra_options):  # another pack's attn2 replacement: plain attention, recorded
        from comfy.ldm.modules.attention import optimized_attention

        seen.append(tuple(extra_options["block"]))
        return optimized_attention(q, k, v, extra_options["n_heads"])

    other = model.clone()
    blocks = [("input", 1), ("input", 2), ("input", 4), ("input", 5), ("input", 7), ("input", 8), *[("output", i) for i in range(3, 12)], ("middle", 0)]
    for block in blocks:
        other.set_model_attn2_replace(foreign, *block, 0)
    patched = patcher_module.apply_image_prompt(other, make_term(patcher_module, checkpoint))
    attn2 = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert set(attn2) == {(*b, 0) for b in blocks}
    assert all(isinstance(p, patcher_module.AttentionPatch) and p.previous is foreign for p in attn2.values())

    latent, context = inputs()
    sigma = sigma_of(model)
    with_foreign_only = noise_prediction(other, latent, sigma, context)
    seen.clear()
    result = noise_prediction(patched, latent, sigma, context)
    assert sorted(seen) == sorted(blocks)  # every layer ran our patch, which called the foreign one
    assert ("middle", 0) in seen
    assert (result - with_foreign_only).abs().max() > 1e-3


def test_conditional_and_unconditional_halves_get_their_own_tokens(patcher_module, model, checkpoint):
    patched = patcher_module.apply_image_prompt(model, make_term(patcher_module, checkpoint))
    latent, context = inputs(batch=4)
    sigma = sigma_of(model, batch=4)
    together = noise_prediction(patched, latent, sigma, context, cond_or_uncond=(1, 0))  # uncond first, 2 each
    uncond_alone = noise_prediction(patched, latent[:2], sigma[:2], context[:2], cond_or_uncond=(1,))
    cond_alone = noise_prediction(patched, latent[2:], sigma[2:], context[2:], cond_or_uncond=(0,))
    assert torch.allclose(together, torch.cat([uncond_alone, cond_alone]), atol=1e-5)
    swapped = noise_prediction(patched, latent, sigma, context, cond_or_uncond=(0, 1))
    assert (swapped - together).abs().max() > 1e-3


def test_two_applications_add_both_terms(patcher_module, model, checkpoint):
    first = make_term(patcher_module, checkpoint, weight=0.7, seed=1)
    second = make_term(patcher_module, checkpoint, weight=-0.4, seed=2)
    twice = patcher_module.apply_image_prompt(patcher_module.apply_image_prompt(model, first), second)
    patch = twice.model_options["transformer_options"]["patches_replace"]["attn2"][("middle", 0, 0)]
    assert patch.terms == (first, second)

    from comfy.ldm.modules.attention import optimized_attention
    from ipadapter.attention import image_attention

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 16, 256, generator=generator)
    k = torch.randn(2, 77, 256, generator=generator)
    v = torch.randn(2, 77, 256, generator=generator)
    options = {"n_heads": 8, "cond_or_uncond": [0, 1], "sigmas": torch.ones(2)}
    expected = optimized_attention(q, k, v, 8)
    for term in (first, second):
        k_ip, v_ip = (t[[0, 1]] for t in term.keys_values[31])
        expected = expected + image_attention(q, k_ip, v_ip, 8, term.weight)
    assert torch.allclose(patch(q, k, v, options), expected, atol=1e-5)


def test_input_model_is_not_mutated_and_clones_share_the_image_weights(patcher_module, model, checkpoint):
    before = copy.deepcopy(model.model_options)
    term = make_term(patcher_module, checkpoint)
    patched = patcher_module.apply_image_prompt(model, term)
    assert model.model_options == before
    assert "patches_replace" not in model.model_options["transformer_options"]

    clone = patched.clone().clone()
    for key, patch in clone.model_options["transformer_options"]["patches_replace"]["attn2"].items():
        original = patched.model_options["transformer_options"]["patches_replace"]["attn2"][key]
        assert patch is not original and patch.terms[0] is original.terms[0] is term
    assert clone.model is patched.model is model.model  # UNet weights shared as well


def test_image_weights_follow_the_unet_dtype_and_device(patcher_module, model, checkpoint):
    term = make_term(patcher_module, checkpoint)
    patched = patcher_module.apply_image_prompt(model, term)
    latent, context = inputs()
    noise_prediction(patched, latent, sigma_of(model), context)
    assert list(term._on_device) == [(torch.device("cpu"), torch.float32)]
    patched.model_patches_to(torch.bfloat16)  # what ComfyUI's model management calls on load
    assert list(term._on_device) == [(torch.device("cpu"), torch.bfloat16)]
    assert term._on_device[(torch.device("cpu"), torch.bfloat16)][31][0].dtype == torch.bfloat16
    patched.model_patches_to(torch.device("cpu"))  # and on offload
    assert all(device == torch.device("cpu") for device, _ in term._on_device)


def test_region_mask_limits_the_image_prompt(patcher_module, model, checkpoint):
    latent, context = inputs()
    sigma = sigma_of(model)
    plain = noise_prediction(model, latent, sigma, context)
    nowhere = patcher_module.apply_image_prompt(model, make_term(patcher_module, checkpoint, mask=torch.zeros(1, 64, 64)))
    assert torch.equal(noise_prediction(nowhere, latent, sigma, context), plain)
    everywhere = patcher_module.apply_image_prompt(model, make_term(patcher_module, checkpoint, mask=torch.ones(64, 64)[None]))
    unmasked = patcher_module.apply_image_prompt(model, make_term(patcher_module, checkpoint))
    assert torch.allclose(noise_prediction(everywhere, latent, sigma, context), noise_prediction(unmasked, latent, sigma, context), atol=1e-6)
