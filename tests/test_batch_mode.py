"""Batches and animation: reference i conditions latent i, per-frame weights, context windows (SD1.5 and SDXL)."""
from types import SimpleNamespace

import pytest
import torch

from devtools.comfy_inprocess import UNetInputs, random_unet_inputs, sigma_at
from test_comfy_patch import architecture, checkpoint, model, patcher_module  # noqa: F401  (module fixtures)
from ipadapter.weighting import layer_weights

LATENTS = 3


def tokens(architecture, references, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(references, 4, architecture.context_dim, generator=generator)


def per_latent_term(patcher_module, checkpoint, cond, frame_weights=None):
    uncond = torch.zeros_like(cond[:1])
    return patcher_module.ImagePromptTerm.build(checkpoint, cond, uncond, layer_weights(checkpoint.spec.architecture, 1.0), 1e9, 0.0,
                                                frame_weights=frame_weights)


@pytest.fixture(scope="module")
def batch(model, architecture):
    """LATENTS latents, their conditional then unconditional halves (the CFG batch)."""
    half = random_unet_inputs(model, architecture.context_dim, batch=LATENTS, seed=3)
    rows = list(range(LATENTS)) * 2
    return half[rows]


def predict(patched, batch, model, window=None):
    options = patched.model_options["transformer_options"]
    if window is not None:  # what ComfyUI's context windows leave in the transformer options
        options["context_window"] = SimpleNamespace(index_list=window, dim=0)
    try:
        return batch.predict(patched, sigma_at(model, batch=batch.latent.shape[0]), cond_or_uncond=(0, 1))
    finally:
        options.pop("context_window", None)


def test_reference_i_changes_latent_i_only(patcher_module, model, checkpoint, architecture, batch):
    refs = tokens(architecture, LATENTS, seed=1)
    changed = refs.clone()
    changed[1] = tokens(architecture, 1, seed=2)[0]
    a = predict(patcher_module.apply_image_prompt(model, per_latent_term(patcher_module, checkpoint, refs)), batch, model)
    b = predict(patcher_module.apply_image_prompt(model, per_latent_term(patcher_module, checkpoint, changed)), batch, model)
    for row in range(2 * LATENTS):
        same = torch.equal(a[row], b[row])
        assert same == (row != 1), row  # latent 1's conditional half; its unconditional half has no reference
    plain = predict(model, batch, model)
    assert not torch.equal(a[0], plain[0])


def test_a_shorter_reference_batch_repeats_its_last_reference(patcher_module, model, checkpoint, architecture, batch):
    refs = tokens(architecture, 2, seed=1)
    padded = torch.cat([refs, refs[1:]])
    short = predict(patcher_module.apply_image_prompt(model, per_latent_term(patcher_module, checkpoint, refs)), batch, model)
    full = predict(patcher_module.apply_image_prompt(model, per_latent_term(patcher_module, checkpoint, padded)), batch, model)
    assert torch.equal(short, full)


def test_frame_weights_scale_each_latent(patcher_module, model, checkpoint, architecture, batch):
    refs = tokens(architecture, 1, seed=1)
    plain = predict(model, batch, model)
    weighted = predict(patcher_module.apply_image_prompt(
        model, per_latent_term(patcher_module, checkpoint, refs, frame_weights=[1.0, 0.0])), batch, model)
    full = predict(patcher_module.apply_image_prompt(model, per_latent_term(patcher_module, checkpoint, refs)), batch, model)
    assert torch.equal(weighted[0], full[0]) and torch.equal(weighted[3], full[3])
    for row in (1, 2, 4, 5):  # weight 0 for frame 1 and, as the last value, for frame 2
        assert torch.equal(weighted[row], plain[row]), row


def test_a_context_window_gets_its_own_frames_references_and_weights(patcher_module, model, checkpoint, architecture, batch):
    refs = tokens(architecture, LATENTS, seed=1)
    term = per_latent_term(patcher_module, checkpoint, refs, frame_weights=[1.0, 0.5, 0.25])
    patched = patcher_module.apply_image_prompt(model, term)
    whole = predict(patched, batch, model)
    window = [1, 2]  # the sampler runs latents 1 and 2 only
    rows = [1, 2, LATENTS + 1, LATENTS + 2]
    part = predict(patched, batch[rows], model, window=window)
    assert torch.allclose(part, whole[rows], atol=1e-5, rtol=1e-4)
    unwindowed = predict(patched, batch[rows], model)  # without the window it would be frames 0 and 1
    assert not torch.allclose(unwindowed, whole[rows], atol=1e-3)
