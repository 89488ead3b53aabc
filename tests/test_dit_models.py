"""devtools.dit_models: the tiny Flux and SD3 transformers compute the same in ComfyUI and in diffusers,
and the full-width builders have the released widths."""
import dataclasses

import pytest
import torch

from devtools import dit_models

TOLERANCE = 1e-5
SHAPES = [(8, 2), ((8, 12), 2), ((12, 8), 1)]  # (latent size, batch)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def halves(batch):
    return (0, 1) if batch == 2 else (0,)


@pytest.fixture(scope="module")
def tiny_flux(comfy):
    model = dit_models.build_diffusers_flux(seed=1)
    return model, dit_models.comfy_flux_from_diffusers(model)


@pytest.fixture(scope="module")
def tiny_sd3(comfy):
    model = dit_models.build_diffusers_sd3(seed=1)
    return model, dit_models.comfy_sd3_from_diffusers(model)


@pytest.mark.parametrize("size, batch", SHAPES)
def test_tiny_flux_matches_diffusers(tiny_flux, size, batch):
    model, patcher = tiny_flux
    inputs = dit_models.flux_inputs(seed=2, batch=batch, size=size)
    theirs = dit_models.run_diffusers_flux(model, inputs)
    ours = dit_models.run_comfy_flux(patcher, inputs, halves(batch))
    assert ours.shape == theirs.shape == inputs.latent.shape
    assert relative_error(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize("size, batch", SHAPES)
def test_tiny_sd3_matches_diffusers(tiny_sd3, size, batch):
    model, patcher = tiny_sd3
    inputs = dit_models.sd3_inputs(seed=2, batch=batch, size=size)
    theirs = dit_models.run_diffusers_sd3(model, inputs)
    ours = dit_models.run_comfy_sd3(patcher, inputs, halves(batch))
    assert ours.shape == theirs.shape == inputs.latent.shape
    assert relative_error(ours, theirs) <= TOLERANCE


def test_flux_parity_depends_on_time_and_guidance_scaling(tiny_flux):
    """A wrong σ or guidance scale on one side would move the output far beyond the tolerance."""
    model, patcher = tiny_flux
    inputs = dit_models.flux_inputs(seed=3)
    theirs = dit_models.run_diffusers_flux(model, inputs)
    for changed in (dataclasses.replace(inputs, sigma=inputs.sigma / 2), dataclasses.replace(inputs, guidance=inputs.guidance * 1000)):
        assert relative_error(dit_models.run_comfy_flux(patcher, changed), theirs) > 100 * TOLERANCE


def test_sd3_parity_depends_on_time_scaling(tiny_sd3):
    model, patcher = tiny_sd3
    inputs = dit_models.sd3_inputs(seed=3)
    theirs = dit_models.run_diffusers_sd3(model, inputs)
    changed = dataclasses.replace(inputs, sigma=inputs.sigma / 2)
    assert relative_error(dit_models.run_comfy_sd3(patcher, changed), theirs) > 100 * TOLERANCE


def assert_random_and_shared(diffusers_norm, comfy_norm):
    assert not torch.allclose(diffusers_norm, torch.ones_like(diffusers_norm), atol=1e-2)
    assert torch.equal(diffusers_norm, comfy_norm)


def test_flux_qk_norms_are_random_on_both_sides(tiny_flux):
    model, patcher = tiny_flux
    ours = patcher.model.diffusion_model
    for theirs, double in zip(model.transformer_blocks, ours.double_blocks):
        assert_random_and_shared(theirs.attn.norm_q.weight, double.img_attn.norm.query_norm.scale)
        assert_random_and_shared(theirs.attn.norm_k.weight, double.img_attn.norm.key_norm.scale)
        assert_random_and_shared(theirs.attn.norm_added_q.weight, double.txt_attn.norm.query_norm.scale)
        assert_random_and_shared(theirs.attn.norm_added_k.weight, double.txt_attn.norm.key_norm.scale)
    for theirs, single in zip(model.single_transformer_blocks, ours.single_blocks):
        assert_random_and_shared(theirs.attn.norm_q.weight, single.norm.query_norm.scale)
        assert_random_and_shared(theirs.attn.norm_k.weight, single.norm.key_norm.scale)


def test_sd3_qk_norms_are_random_on_both_sides(tiny_sd3):
    model, patcher = tiny_sd3
    for theirs, joint in zip(model.transformer_blocks, patcher.model.diffusion_model.joint_blocks):
        assert_random_and_shared(theirs.attn.norm_q.weight, joint.x_block.attn.ln_q.weight)
        assert_random_and_shared(theirs.attn.norm_k.weight, joint.x_block.attn.ln_k.weight)
        assert_random_and_shared(theirs.attn.norm_added_q.weight, joint.context_block.attn.ln_q.weight)
        assert_random_and_shared(theirs.attn.norm_added_k.weight, joint.context_block.attn.ln_k.weight)


@pytest.mark.parametrize("build, convert", [
    (dit_models.build_diffusers_flux, dit_models.comfy_flux_from_diffusers),
    (dit_models.build_diffusers_sd3, dit_models.comfy_sd3_from_diffusers),
])
def test_conversion_leaves_the_diffusers_model_alone(comfy, build, convert):
    """ComfyUI's converter writes swapped scale/shift halves back into the tensors it is given."""
    model = build(seed=4)
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    convert(model)
    assert all(torch.equal(before[key], tensor) for key, tensor in model.state_dict().items())


def test_full_width_flux_has_flux_dev_widths(comfy):
    patcher = dit_models.full_width_flux_comfy(double=1, single=1)
    flux = patcher.model.diffusion_model
    assert type(patcher.model) is comfy.model_base.Flux
    assert (flux.hidden_size, flux.num_heads, flux.hidden_size // flux.num_heads) == (3072, 24, 128)
    assert (len(flux.double_blocks), len(flux.single_blocks)) == (1, 1)
    assert flux.img_in.weight.shape == (3072, 64)
    assert flux.txt_in.weight.shape == (3072, 4096)
    assert flux.vector_in.in_layer.weight.shape == (3072, 768)
    assert flux.params.guidance_embed and flux.guidance_in.in_layer.weight.shape == (3072, 256)
    assert flux.img_in.weight.dtype == torch.bfloat16
    inputs = dit_models.flux_inputs(batch=2, context_dim=4096, pooled_dim=768)
    out = dit_models.run_comfy_flux(patcher, inputs)
    assert out.shape == inputs.latent.shape and out.isfinite().all()


def test_full_width_sd35_has_sd35_large_widths(comfy):
    patcher = dit_models.full_width_sd35_comfy(blocks=2)
    mmdit = patcher.model.diffusion_model
    assert type(patcher.model) is comfy.model_base.SD3
    assert (mmdit.hidden_size, mmdit.num_heads, mmdit.hidden_size // mmdit.num_heads) == (2432, 38, 64)
    assert len(mmdit.joint_blocks) == 2 and mmdit.joint_blocks[-1].context_block.pre_only
    assert mmdit.context_embedder.weight.shape == (2432, 4096)
    assert mmdit.y_embedder.mlp[0].weight.shape == (2432, 2048)
    assert mmdit.pos_embed_max_size == 192
    assert mmdit.joint_blocks[0].x_block.attn.ln_q.weight.shape == (64,)
    assert mmdit.x_embedder.proj.weight.dtype == torch.bfloat16
    inputs = dit_models.sd3_inputs(batch=2, context_dim=4096, pooled_dim=2048)
    out = dit_models.run_comfy_sd3(patcher, inputs)
    assert out.shape == inputs.latent.shape and out.isfinite().all()
