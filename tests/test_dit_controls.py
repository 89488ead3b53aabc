"""The DiT families under the node's controls, on tiny Flux / SD3 models in ComfyUI: λ = 0 and a step outside the
window are exactly the model without the adapter, another pack's block patch keeps working under ours, masks,
frame weights and stacking act, the controls without meaning for a DiT are refused in one line, and so are
adapters of another family or encoder."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from devtools import dit_adapters, dit_models
from devtools.adapter_factory import write_flat_adapter
from devtools.comfy_inprocess import build_sd15_model_patcher, pack_module

EMBED = 24


@pytest.fixture(scope="module")
def nodes_module():
    return pack_module("nodes")


@pytest.fixture(scope="module")
def flux():
    return dit_models.comfy_flux_from_diffusers(dit_models.build_diffusers_flux(4, num_layers=19, num_single_layers=38))


@pytest.fixture(scope="module")
def sd3():
    return dit_models.comfy_sd3_from_diffusers(dit_models.build_diffusers_sd3(5, num_layers=38))


def load(nodes_module, path):
    checkpoint = pack_module("ipadapter.adapter_file").load_adapter(path, base_width=None)
    return nodes_module.LoadedAdapter(checkpoint, checkpoint.build_projection())


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, nodes_module):
    folder = tmp_path_factory.mktemp("dit_adapters")
    save_file(dit_adapters.xlabs_file_tensors(16, 32, 64, EMBED, seed=1), str(folder / "xlabs.safetensors"))
    torch.save(dit_adapters.instantx_flux_state(6, 32, 64, EMBED, hidden=48, seed=2), folder / "instantx.bin")
    torch.save(dit_adapters.sd35_state(128, 2, features=32, dim=128, queries=8, seed=3), folder / "sd35.bin")
    return {name: load(nodes_module, folder / file) for name, file in
            (("xlabs", "xlabs.safetensors"), ("instantx", "instantx.bin"), ("sd35", "sd35.bin"))}


def embeds_for(name, references=1, seed=0):
    images = pack_module("ipadapter.image_prompt").EncodedImages
    generator = torch.Generator().manual_seed(seed)
    if name == "sd35":
        return images(torch.zeros(references, 8), torch.randn(references, 10, 32, generator=generator), None, None, "t")
    return images(torch.randn(references, EMBED, generator=generator), torch.zeros(references, 1, 8), None, None, "t")


CASES = [("xlabs", "flux"), ("instantx", "flux"), ("sd35", "sd3")]


def run(model, family, cond_or_uncond=(0, 1), batch=2, sigma=0.6):
    if family == "flux":
        return dit_models.run_comfy_flux(model, dit_models.flux_inputs(seed=7, batch=batch, sigma=sigma), cond_or_uncond)
    return dit_models.run_comfy_sd3(model, dit_models.sd3_inputs(seed=7, batch=batch, sigma=sigma), cond_or_uncond)


def models(request, family):
    return request.getfixturevalue(family)


@pytest.mark.parametrize("adapter,family", CASES)
def test_weight_zero_and_outside_the_window_are_the_plain_model(request, nodes_module, adapters, adapter, family):
    model = models(request, family)
    plain = run(model, family)
    zero = nodes_module.patch_model(model, adapters[adapter], embeds_for(adapter), weight=0.0)
    assert torch.equal(run(zero, family), plain)
    # σ = 0.6 is early in the schedule; a window over its last 30% does not include it
    late = nodes_module.patch_model(model, adapters[adapter], embeds_for(adapter), weight=1.0, start_at=0.7, end_at=1.0)
    assert torch.equal(run(late, family), plain)
    active = nodes_module.patch_model(model, adapters[adapter], embeds_for(adapter), weight=1.0)
    assert not torch.allclose(run(active, family), plain, atol=1e-3)
    assert model.model_options["transformer_options"].get("patches_replace", {}).get("dit") is None  # never changed


@pytest.mark.parametrize("adapter,family", CASES)
def test_another_packs_block_patch_keeps_working(request, nodes_module, adapters, adapter, family):
    model = models(request, family)
    block = ("double_block", 0)

    def theirs(args, extra):  # what another pack does: run the block, then change its image stream
        out = extra["original_block"](args)
        return {**out, "img": out["img"] * 1.5}

    other = model.clone()
    other.set_model_patch_replace(theirs, "dit", *block)
    their_output = run(other, family)
    assert torch.equal(run(nodes_module.patch_model(other, adapters[adapter], embeds_for(adapter), weight=0.0), family),
                       their_output)
    both = run(nodes_module.patch_model(other, adapters[adapter], embeds_for(adapter), weight=1.0), family)
    ours = run(nodes_module.patch_model(model, adapters[adapter], embeds_for(adapter), weight=1.0), family)
    assert not torch.allclose(both, their_output, atol=1e-3) and not torch.allclose(both, ours, atol=1e-3)


@pytest.mark.parametrize("adapter,family", CASES)
def test_stacked_prompts_and_frame_weights(request, nodes_module, adapters, adapter, family):
    model = models(request, family)
    once = nodes_module.patch_model(model, adapters[adapter], embeds_for(adapter), weight=0.5)
    twice = nodes_module.patch_model(once, adapters[adapter], embeds_for(adapter), weight=0.5)
    single = nodes_module.patch_model(model, adapters[adapter], embeds_for(adapter), weight=1.0)
    if adapter != "sd35":  # the V-only term is linear in λ: two halves are one whole (SD3.5's attends jointly)
        torch.testing.assert_close(run(twice, family), run(single, family), rtol=1e-4, atol=1e-5)
    # frame weights 1, 0: the first latent as with λ, the second as without the adapter
    framed = nodes_module.patch_model(model, adapters[adapter], embeds_for(adapter), weight=1.0, frame_weights="1, 0")
    out, plain, full = (run(m, family, cond_or_uncond=(0,)) for m in (framed, model, single))
    torch.testing.assert_close(out[1], plain[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0], full[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adapter,family", CASES)
def test_mask_limits_the_prompt_to_its_region(request, nodes_module, adapters, adapter, family):
    """Through apply_model with the patcher's wrappers, as ComfyUI's sampling calls it (its APPLY_MODEL wrapper tells
    the blocks the latent's size)."""
    model = models(request, family)
    inputs = (dit_models.flux_inputs if family == "flux" else dit_models.sd3_inputs)(seed=3, batch=1, size=8)

    def denoised(patcher):
        options = {**patcher.model_options["transformer_options"], "cond_or_uncond": [0], "sigmas": inputs.sigma,
                   "wrappers": patcher.wrappers}
        extra = {"guidance": inputs.guidance} if inputs.guidance is not None else {}
        with torch.no_grad():
            return patcher.model.apply_model(inputs.latent, inputs.sigma, c_crossattn=inputs.context, y=inputs.pooled,
                                             transformer_options=options, **extra)

    plain = denoised(model)
    nowhere = nodes_module.patch_model(model, adapters[adapter], embeds_for(adapter), attn_mask=torch.zeros(1, 64, 64))
    torch.testing.assert_close(denoised(nowhere), plain, rtol=0, atol=1e-6)
    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1
    masked = denoised(nodes_module.patch_model(model, adapters[adapter], embeds_for(adapter), attn_mask=left))
    unmasked = denoised(nodes_module.patch_model(model, adapters[adapter], embeds_for(adapter)))
    assert not torch.allclose(masked, plain, atol=1e-4) and not torch.allclose(masked, unmasked, atol=1e-4)


def one_line_error(call, *fragments):
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_controls_without_meaning_for_a_dit_are_refused(flux, nodes_module, adapters):
    patch = nodes_module.patch_model
    one_line_error(lambda: patch(flux, adapters["xlabs"], embeds_for("xlabs"), weight_type="weak input"),
                   "'weak input' names UNet blocks", "Flux.1 is a DiT", "expected one of linear")
    one_line_error(lambda: patch(flux, adapters["xlabs"], embeds_for("xlabs"), weight_type="style transfer"),
                   "'style transfer'", "expected one of linear")
    one_line_error(lambda: patch(flux, adapters["xlabs"], embeds_for("xlabs"), layer_weights="style"),
                   "layer preset 'style' is not defined for Flux.1", "double blocks, single blocks")
    singles = run(patch(flux, adapters["instantx"], embeds_for("instantx"), layer_weights="single blocks"), "flux")
    everything = run(patch(flux, adapters["instantx"], embeds_for("instantx")), "flux")
    assert not torch.allclose(singles, everything, atol=1e-4)


def test_adapters_of_another_family_or_encoder_are_refused(tmp_path, flux, sd3, nodes_module, adapters):
    adapter_file = pack_module("ipadapter.adapter_file")
    sd15_model = build_sd15_model_patcher(model_channels=64)
    one_line_error(lambda: nodes_module.patch_model(sd15_model, adapters["xlabs"], embeds_for("xlabs")),
                   "is an Flux.1 adapter, but the MODEL is SD1.5")
    one_line_error(lambda: nodes_module.patch_model(sd3, adapters["instantx"], embeds_for("instantx")),
                   "is an Flux.1 adapter, but the MODEL is SD3.5 Large")
    one_line_error(lambda: nodes_module.patch_model(flux, adapters["sd35"], embeds_for("sd35")),
                   "is an SD3.5 Large adapter, but the MODEL is Flux.1")
    sdxl_path = tmp_path / "ip-adapter_sdxl.safetensors"
    write_flat_adapter(sdxl_path, seed=0, variant="base", family="sdxl", encoder_width=1280)
    one_line_error(lambda: nodes_module.patch_model(flux, load(nodes_module, sdxl_path), embeds_for("xlabs")),
                   "is an SDXL adapter, but the MODEL is Flux.1")
    # the released widths (shapes only): XLabs wants CLIP ViT-L/14 embeddings, InstantX SigLIP's
    xlabs = adapter_file.IPAdapterCheckpoint.from_state_dicts(
        *adapter_file.split_groups(dit_adapters.xlabs_file_tensors(device="meta"), "ip_adapter.safetensors"),
        "ip_adapter.safetensors")
    instantx = adapter_file.IPAdapterCheckpoint.from_state_dicts(
        **dit_adapters.instantx_flux_state(device="meta"), source="ip-adapter.bin")
    one_line_error(lambda: adapter_file.check_encoder(xlabs.spec, 1152, 1152, xlabs.source, "SigLIP so400m-patch14-384"),
                   "expects OpenAI CLIP ViT-L/14 image embeddings of width 768", "gives 1152")
    one_line_error(lambda: adapter_file.check_encoder(instantx.spec, 768, 1024, instantx.source, "OpenAI CLIP ViT-L/14"),
                   "expects SigLIP so400m-patch14-384 image embeddings of width 1152", "gives 768")


def test_truncated_or_code_running_pickles_are_refused(tmp_path):
    adapter_file = pack_module("ipadapter.adapter_file")
    path = tmp_path / "ip-adapter.bin"
    torch.save(dit_adapters.instantx_flux_state(6, 32, 64, EMBED, hidden=48), path)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    one_line_error(lambda: adapter_file.load_adapter(truncated, base_width=None), "'truncated.bin'",
                   "truncated or corrupt")
    sentinel = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    evil = tmp_path / "evil.bin"
    torch.save({"image_proj": {"x": RunsCode()}, "ip_adapter": {}}, evil)
    one_line_error(lambda: adapter_file.load_adapter(evil, base_width=None), "'evil.bin' was refused")
    assert not sentinel.exists()


def test_xlabs_file_is_written_back_in_its_own_layout(tmp_path):
    from safetensors.torch import load_file

    adapter_file = pack_module("ipadapter.adapter_file")
    tensors = dit_adapters.xlabs_file_tensors(4, 32, 64, EMBED, seed=3)
    save_file(tensors, str(tmp_path / "ip_adapter.safetensors"))
    checkpoint = adapter_file.load_adapter(tmp_path / "ip_adapter.safetensors", base_width=None)
    adapter_file.save_adapter(checkpoint, tmp_path / "copy.safetensors", dtype=None)
    written = load_file(str(tmp_path / "copy.safetensors"))
    assert set(written) == set(tensors) and all(torch.equal(written[key], tensors[key]) for key in tensors)


def test_attention_map_shows_where_a_masked_prompt_lands(flux, nodes_module, adapters):
    """The Attention Map node samples one step of the patched Flux through ComfyUI's sampler."""
    generator = torch.Generator().manual_seed(11)
    positive = [[torch.randn(1, 7, 32, generator=generator), {"pooled_output": torch.randn(1, 24, generator=generator),
                                                              "guidance": 3.5}]]
    negative = [[torch.zeros(1, 7, 32), {"pooled_output": torch.zeros(1, 24), "guidance": 3.5}]]
    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1
    patched = nodes_module.patch_model(flux, adapters["instantx"], embeds_for("instantx"), attn_mask=left)
    images, average = nodes_module.IPAdapterKitAttentionMap().map(
        patched, positive, negative, {"samples": torch.zeros(1, 16, 8, 8)}, seed=0, steps=4, at_step=1, cfg=1.0)
    assert images.shape[0] == 1 + 57  # the average, then every block
    assert average[0, :, 48:].max() == 0 and average[0, :, :16].max() > 0.5  # the maps are bilinear: a soft edge
