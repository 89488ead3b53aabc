"""The attn2 patches inside a real ComfyUI UNet, for every family (SD1.5: 16 layers, SDXL: 70), scaled down."""
import copy

import pytest
import torch

from devtools.adapter_factory import random_adapter
from devtools.comfy_inprocess import build_sd15_model_patcher, pack_module, random_unet_inputs, sigma_at
from ipadapter.registry import family_by_id
from ipadapter.weighting import LayerWeight
from ipadapter.adapter_file import IPAdapterCheckpoint
from devtools.sdxl_models import build_sdxl_model_patcher

pytestmark = pytest.mark.comfyui_2024

WIDTH = 64  # model_channels of the scaled-down UNets
BUILDERS = {"sd15": build_sd15_model_patcher, "sdxl": build_sdxl_model_patcher}


@pytest.fixture(scope="module")
def patcher_module(comfy):
    return pack_module("patcher")


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def architecture(request):
    return family_by_id(request.param)


@pytest.fixture(scope="module")
def model(comfy, architecture):
    return BUILDERS[architecture.id](WIDTH)


@pytest.fixture(scope="module")
def checkpoint(architecture):
    nested = random_adapter("base", base_width=WIDTH, seed=1, family=architecture.id)
    return IPAdapterCheckpoint.from_state_dicts(**nested, base_width=None)


@pytest.fixture(scope="module")
def middle(architecture):
    """The first middle-block layer: in both families 4 x WIDTH wide."""
    return architecture.layer_by_patch_key[("middle", 0, 0)]


def make_term(patcher_module, checkpoint, weight=1.0, sigma_start=1e9, sigma_end=0.0, mask=None, seed=0, layers=None):
    architecture = checkpoint.spec.architecture
    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, 4, architecture.context_dim, generator=generator)
    uncond = torch.randn(1, 4, architecture.context_dim, generator=generator)
    multipliers = layers or {k: 1.0 for k in architecture.keys}
    layer_weights = {key: LayerWeight(weight * multiplier) for key, multiplier in multipliers.items()}
    return patcher_module.ImagePromptTerm.build(checkpoint, cond, uncond, layer_weights, sigma_start, sigma_end, mask)


@pytest.fixture(scope="module")
def inputs(model, architecture):
    return random_unet_inputs(model, architecture.context_dim, batch=2)


def test_weight_zero_is_exactly_the_unpatched_model(patcher_module, model, checkpoint, inputs):
    sigma = sigma_at(model)
    plain = inputs.predict(model, sigma)
    patched = patcher_module.apply_image_prompt(model, make_term(patcher_module, checkpoint, weight=0.0))
    assert torch.equal(inputs.predict(patched, sigma), plain)
    active = patcher_module.apply_image_prompt(model, make_term(patcher_module, checkpoint, weight=1.0))
    assert (inputs.predict(active, sigma) - plain).abs().max() > 1e-3


def test_outside_the_step_window_is_exactly_the_unpatched_model(patcher_module, model, checkpoint, inputs):
    sampling = model.model.model_sampling
    term = make_term(patcher_module, checkpoint, sigma_start=sampling.percent_to_sigma(0.5), sigma_end=sampling.percent_to_sigma(1.0))
    patched = patcher_module.apply_image_prompt(model, term)
    early, late = sigma_at(model, t=900), sigma_at(model, t=100)
    assert torch.equal(inputs.predict(patched, early), inputs.predict(model, early))
    assert not torch.equal(inputs.predict(patched, late), inputs.predict(model, late))


@pytest.mark.parametrize("foreign_key", ["layer", "block"])  # set per (block, id, index), or per (block, id) for all its layers
def test_every_layer_patched_and_a_foreign_patch_is_called_through(patcher_module, model, checkpoint, inputs, architecture, foreign_key):
    seen = []

    def foreign(q, k, v, extra_options):  # another pack's attn2 replacement: plain attention, recorded
        from comfy.ldm.modules.attention import optimized_attention

        seen.append((*extra_options["block"], extra_options["block_index"]))
        return optimized_attention(q, k, v, extra_options["n_heads"])

    other = model.clone()
    layer_keys = [layer.comfy_patch_key for layer in architecture.layers]
    foreign_keys = set(layer_keys) if foreign_key == "layer" else {layer.comfy_block for layer in architecture.layers}
    for key in foreign_keys:
        other.set_model_attn2_replace(foreign, *key)
    patched = patcher_module.apply_image_prompt(other, make_term(patcher_module, checkpoint))
    attn2 = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    ours = {key: patch for key, patch in attn2.items() if isinstance(patch, patcher_module.AttentionPatch)}
    assert set(ours) == set(layer_keys) and len(ours) == len(architecture.layers)  # 16 or 70, every transformer index
    assert all(patch.key == architecture.layer_by_patch_key[key].key and patch.previous is foreign for key, patch in ours.items())

    sigma = sigma_at(model)
    with_foreign_only = inputs.predict(other, sigma)
    seen.clear()
    result = inputs.predict(patched, sigma)
    assert sorted(seen) == sorted(layer_keys)  # every layer ran our patch once, which called the foreign one
    assert (result - with_foreign_only).abs().max() > 1e-3


def test_conditional_and_unconditional_halves_get_their_own_tokens(patcher_module, model, checkpoint, architecture):
    patched = patcher_module.apply_image_prompt(model, make_term(patcher_module, checkpoint))
    inputs = random_unet_inputs(model, architecture.context_dim, batch=4)
    sigma = sigma_at(model, batch=4)
    together = inputs.predict(patched, sigma, cond_or_uncond=(1, 0))  # uncond first, 2 each
    uncond_alone = inputs[:2].predict(patched, sigma[:2], cond_or_uncond=(1,))
    cond_alone = inputs[2:].predict(patched, sigma[2:], cond_or_uncond=(0,))
    assert torch.allclose(together, torch.cat([uncond_alone, cond_alone]), atol=1e-5)
    swapped = inputs.predict(patched, sigma, cond_or_uncond=(0, 1))
    assert (swapped - together).abs().max() > 1e-3


def test_two_applications_add_both_terms(patcher_module, model, checkpoint, middle):
    first = make_term(patcher_module, checkpoint, weight=0.7, seed=1)
    second = make_term(patcher_module, checkpoint, weight=-0.4, seed=2)
    twice = patcher_module.apply_image_prompt(patcher_module.apply_image_prompt(model, first), second)
    patch = twice.model_options["transformer_options"]["patches_replace"]["attn2"][middle.comfy_patch_key]
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
        k_ip, v_ip = (t[[0, 1]] for t in term.keys_values[middle.key])
        expected = expected + image_attention(q, k_ip, v_ip, 8, term.layer_weight(middle.key))
    assert torch.allclose(patch(q, k, v, options), expected, atol=1e-5)


def test_input_model_is_not_mutated_and_clones_share_the_image_weights(patcher_module, model, checkpoint, inputs):
    before = copy.deepcopy(model.model_options)
    term = make_term(patcher_module, checkpoint)
    patched = patcher_module.apply_image_prompt(model, term)
    assert model.model_options == before
    assert "patches_replace" not in model.model_options["transformer_options"]
    weights = {name: tensor.clone() for name, tensor in model.model.diffusion_model.state_dict().items()}
    inputs.predict(patched, sigma_at(model))
    assert model.model_options == before
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.model.diffusion_model.state_dict().items())

    clone = patched.clone().clone()
    for key, patch in clone.model_options["transformer_options"]["patches_replace"]["attn2"].items():
        original = patched.model_options["transformer_options"]["patches_replace"]["attn2"][key]
        assert patch is not original and patch.terms[0] is original.terms[0] is term
    assert clone.model is patched.model is model.model  # UNet weights shared as well


def test_image_weights_follow_the_unet_dtype_and_device(patcher_module, model, checkpoint, inputs, middle):
    term = make_term(patcher_module, checkpoint)
    patched = patcher_module.apply_image_prompt(model, term)
    inputs.predict(patched, sigma_at(model))
    assert list(term._on_device) == [(torch.device("cpu"), torch.float32)]
    patched.model_patches_to(torch.bfloat16)  # what ComfyUI's model management calls on load
    assert list(term._on_device) == [(torch.device("cpu"), torch.bfloat16)]
    assert term._on_device[(torch.device("cpu"), torch.bfloat16)][middle.key][0].dtype == torch.bfloat16
    patched.model_patches_to(torch.device("cpu"))  # and on offload
    assert all(device == torch.device("cpu") for device, _ in term._on_device)


def test_region_mask_limits_the_image_prompt(patcher_module, model, checkpoint, inputs):
    sigma = sigma_at(model)
    plain = inputs.predict(model, sigma)
    nowhere = patcher_module.apply_image_prompt(model, make_term(patcher_module, checkpoint, mask=torch.zeros(1, 64, 64)))
    assert torch.equal(inputs.predict(nowhere, sigma), plain)
    everywhere = patcher_module.apply_image_prompt(model, make_term(patcher_module, checkpoint, mask=torch.ones(64, 64)[None]))
    unmasked = patcher_module.apply_image_prompt(model, make_term(patcher_module, checkpoint))
    assert torch.allclose(inputs.predict(everywhere, sigma), inputs.predict(unmasked, sigma), atol=1e-6)


def test_region_mask_on_an_odd_non_square_latent_reaches_every_level(patcher_module, model, checkpoint, architecture):
    # 9 x 13 latents give 5 x 7 and 3 x 4 token grids (SDXL's two attention levels; SD1.5 has a third, 2 x 2)
    inputs = random_unet_inputs(model, architecture.context_dim, batch=2, seed=1, size=(9, 13))
    sigma = sigma_at(model)
    mask = torch.zeros(1, 72, 104)
    mask[:, :, :52] = 1  # left half
    half = patcher_module.apply_image_prompt(model, make_term(patcher_module, checkpoint, mask=mask))
    everywhere = patcher_module.apply_image_prompt(model, make_term(patcher_module, checkpoint))
    plain, masked, unmasked = (inputs.predict(m, sigma) for m in (model, half, everywhere))
    assert masked.shape == plain.shape == (2, 4, 9, 13)
    assert (masked - plain).abs().max() > 1e-3 and (masked - unmasked).abs().max() > 1e-3
