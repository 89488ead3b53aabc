"""The DiT trainer's exports through our ComfyUI nodes (ComfyUI in-process): XLabs and InstantX on Flux.1, InstantX
on SD3.5, each loaded by our loader node and applied at weight 1 by our apply node to a ComfyUI model with the
trained transformer's weights, give the training model's velocity at the same latents, σ, text and image features.

The batch is a conditional row and an unconditional one; the training model gets, for the latter, the zero
features our nodes take when no negative image is given."""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from devtools import dit_models
from devtools.comfy_inprocess import pack_module
from dit_training_fixtures import SIGLIP_WIDTH, files, instantx, instantx_flux, xlabs  # noqa: F401 (fixtures)
from training.dit_models import DiTParts

TOLERANCE = 1e-4  # of the largest |velocity|
XLABS_EMBED = 32  # the tiny CLIP's image embeddings


@dataclass(frozen=True)
class Case:
    """One trained export: its run (a fixture), ComfyUI's model class for it, and the image features it reads."""

    run: str
    family: str
    variant: str
    comfy_twin: Callable  # a ComfyUI ModelPatcher with a diffusers transformer's weights
    run_comfy: Callable
    inputs: Callable  # DiTInputs for a transformer's config
    image_embeds: tuple  # the shapes of one reference's pooled embedding and hidden states
    penultimate: tuple

    def features(self, generator) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(1, *self.image_embeds, generator=generator) * 2,
                torch.randn(1, *self.penultimate, generator=generator))


def flux_inputs(config):
    return dit_models.flux_inputs(seed=7, size=4, tokens=5, context_dim=config.joint_attention_dim,
                                  pooled_dim=config.pooled_projection_dim, guidance=3.5)


def sd3_inputs(config):
    return dit_models.sd3_inputs(seed=8, size=4, tokens=5, context_dim=config.joint_attention_dim,
                                 pooled_dim=config.pooled_projection_dim)


CASES = [
    Case("xlabs", "flux", "xlabs", dit_models.comfy_flux_from_diffusers, dit_models.run_comfy_flux, flux_inputs,
         (XLABS_EMBED,), (1, 8)),
    Case("instantx_flux", "flux", "instantx", dit_models.comfy_flux_from_diffusers, dit_models.run_comfy_flux,
         flux_inputs, (SIGLIP_WIDTH,), (1, 8)),
    Case("instantx", "sd35", "instantx", dit_models.comfy_sd3_from_diffusers, dit_models.run_comfy_sd3, sd3_inputs,
         (8,), (9, SIGLIP_WIDTH)),
]


def frozen_copy(transformer):
    """The training model's transformer without the adapter's processors (ComfyUI's twin is built from its tensors)."""
    copy = type(transformer).from_config(transformer.config)
    copy.load_state_dict({k: v for k, v in transformer.state_dict().items() if ".processor." not in k})
    return copy.float().eval()


def training_velocity(model, inputs, features) -> torch.Tensor:
    parts = DiTParts(model.transformer, None, {}, {}, {}, {}, model.family, torch.float32)
    with torch.no_grad():
        return model.eval()(parts, inputs.latent, inputs.sigma, inputs.context, inputs.pooled, features).float()


def load_with_our_node(nodes, export):
    import folder_paths

    folder_paths.add_model_folder_path(nodes.MODEL_FOLDER, str(export.parent))
    (adapter,) = nodes.IPAdapterKitLoader().load(export.name)
    return adapter


@pytest.mark.parametrize("case", CASES, ids=[case.run for case in CASES])
def test_the_export_in_our_nodes_gives_the_training_models_velocity(comfy, request, case):
    result = request.getfixturevalue(case.run)
    model, nodes = result["model"], pack_module("nodes")
    exports = {path.suffix: path for path in result["export"]}
    adapter = load_with_our_node(nodes, exports[".safetensors"])
    spec = adapter.checkpoint.spec
    assert (spec.architecture.id, spec.variant, spec.num_tokens) == (case.family, case.variant, model.tokens)
    if ".bin" in exports:  # the same tensors in the pickle
        pickled = load_with_our_node(nodes, exports[".bin"]).checkpoint
        for group in ("image_proj", "ip_adapter"):
            ours, theirs = getattr(adapter.checkpoint, group), getattr(pickled, group)
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    image_embeds, penultimate = case.features(torch.Generator().manual_seed(9))
    embeds = pack_module("ipadapter.image_prompt").EncodedImages(image_embeds, penultimate, None, None, "test encoder")
    twin = case.comfy_twin(frozen_copy(model.transformer))
    (patched,) = nodes.IPAdapterKitApply().apply(twin, adapter, 1.0, 0.0, 1.0, "average", "all", "", embeds=embeds)
    inputs = case.inputs(model.transformer.config)
    from_comfy = case.run_comfy(patched, inputs, cond_or_uncond=(0, 1))
    plain = case.run_comfy(twin, inputs, cond_or_uncond=(0, 1))

    reference = image_embeds if model.row.encoder_input == "image_embeds" else penultimate
    from_training = training_velocity(model, inputs, torch.cat([reference, torch.zeros_like(reference)]))
    scale = from_training.abs().max()
    for row in (0, 1):  # the image term acts in both rows, so a wrong input in either would show
        assert (from_comfy[row] - plain[row]).abs().max() > 1e-2 * scale, row
    assert (from_comfy - from_training).abs().max() <= TOLERANCE * scale
