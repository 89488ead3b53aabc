"""The DiT adapters at the released widths: their layouts' tensor shapes and parameter counts, and λ = 0 exact on
full-width, reduced-depth models loaded by ComfyUI's stock detection (bf16).

Parameter counts of the released files, from the architectures in their published code (XLabs-AI/x-flux
``ImageProjModel(768 -> 4 or 16 x 4096)`` + ``IPDoubleStreamBlockProcessor(4096 -> 3072, bias)`` x 19; InstantX's
``MLPProjModel(1152 -> 2304 -> 128 x 4096)`` + ``IPAFluxAttnProcessor2_0(4096 -> 3072, no bias)`` x 57; diffusers'
``IPAdapterTimeImageProjection`` defaults (1152 -> 1280, 4 layers, 64 queries -> 2432, timestep 320) +
``SD3IPAdapterJointAttnProcessor2_0(2432, head 64, timestep 1280)`` x 38). At 2 bytes per parameter they give the
files' sizes (XLabs v1 0.98 GB, InstantX Flux 5.29 GB).
"""
from __future__ import annotations

import pytest
import torch

from devtools import dit_adapters, dit_models
from devtools.comfy_inprocess import pack_module

RELEASED_PARAMETERS = {"xlabs-v1": 490_874_880, "xlabs-v2": 528_672_768, "instantx-flux": 2_645_600_512,
                       "instantx-sd35": 797_925_888}
LAYOUTS = {
    "xlabs-v1": lambda device: dit_adapters.xlabs_file_tensors(4, device=device, dtype=torch.bfloat16),
    "xlabs-v2": lambda device: dit_adapters.xlabs_file_tensors(16, device=device, dtype=torch.bfloat16),
    "instantx-flux": lambda device: dit_adapters.instantx_flux_state(device=device, dtype=torch.bfloat16),
    "instantx-sd35": lambda device: dit_adapters.sd35_state(device=device, dtype=torch.bfloat16),
}
EXPECTED = {  # variant, family, tokens, token width, encoder input and width, blocks it carries
    "xlabs-v1": ("xlabs", "flux", 4, 4096, "image_embeds", 768, 19),
    "xlabs-v2": ("xlabs", "flux", 16, 4096, "image_embeds", 768, 19),
    "instantx-flux": ("instantx", "flux", 128, 4096, "image_embeds", 1152, 57),
    "instantx-sd35": ("instantx", "sd35", 64, 2432, "penultimate", 1152, 38),
}


def checkpoint_of(tensors, source):
    adapter_file = pack_module("ipadapter.adapter_file")
    groups = tensors if "image_proj" in tensors else dict(zip(("image_proj", "ip_adapter"),
                                                              adapter_file.split_groups(tensors, source)))
    return adapter_file.IPAdapterCheckpoint.from_state_dicts(**groups, source=source)  # the released widths


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_released_layouts_are_read_at_full_width(layout):
    tensors = LAYOUTS[layout]("meta")
    assert dit_adapters.count(tensors) == RELEASED_PARAMETERS[layout]
    spec = checkpoint_of(tensors, layout).spec
    variant, family, tokens, width, encoder_input, encoder_width, blocks = EXPECTED[layout]
    assert (spec.variant, spec.architecture.id, spec.num_tokens, spec.cross_attention_dim) == (variant, family, tokens, width)
    assert (spec.encoder_input, spec.encoder_width, len(spec.layer_keys)) == (encoder_input, encoder_width, blocks)
    assert spec.base_width == spec.architecture.base_width
    with torch.device("meta"):
        projection = pack_module("ipadapter.adapter_file").build_projection(spec)
    image_proj = tensors["image_proj"] if "image_proj" in tensors else {
        key.split(".", 1)[1]: value for key, value in tensors.items() if key.startswith("ip_adapter_proj_model.")}
    assert {k: tuple(v.shape) for k, v in projection.state_dict().items()} == {k: tuple(v.shape) for k, v in image_proj.items()}


@pytest.fixture(scope="module")
def nodes_module():
    return pack_module("nodes")


@pytest.mark.parametrize("layout,family", [("xlabs-v2", "flux"), ("instantx-sd35", "sd3")])
def test_weight_zero_is_exact_on_full_width_models(nodes_module, layout, family):
    """Flux: 1 double + 1 single block at 3072 wide; SD3.5 Large: 2 joint blocks at 2432 wide (the adapters' other
    blocks have no block to patch). InstantX Flux's 2.6 B parameters stay at their shapes above."""
    checkpoint = checkpoint_of(LAYOUTS[layout]("cpu"), layout)
    adapter = nodes_module.LoadedAdapter(checkpoint, checkpoint.build_projection())
    images = pack_module("ipadapter.image_prompt").EncodedImages
    generator = torch.Generator().manual_seed(0)
    embeds = images(torch.randn(1, 768, generator=generator), torch.randn(1, 729, 1152, generator=generator), None,
                    None, "full width")
    if family == "flux":
        model = dit_models.full_width_flux_comfy(double=1, single=1)
        inputs = dit_models.flux_inputs(seed=1, batch=1, size=4, context_dim=4096, pooled_dim=768)
        run = dit_models.run_comfy_flux
    else:
        model = dit_models.full_width_sd35_comfy(blocks=2)
        inputs = dit_models.sd3_inputs(seed=1, batch=1, size=4, context_dim=4096, pooled_dim=2048)
        run = dit_models.run_comfy_sd3
    plain = run(model, inputs, cond_or_uncond=(0,))
    zero = run(nodes_module.patch_model(model, adapter, embeds, weight=0.0), inputs, cond_or_uncond=(0,))
    assert torch.equal(zero, plain)
    active = run(nodes_module.patch_model(model, adapter, embeds, weight=1.0), inputs, cond_or_uncond=(0,))
    assert torch.isfinite(active).all() and not torch.equal(active, plain)
