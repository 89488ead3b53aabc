"""bench/gpu.py's CPU dry run writes the GPU run's JSON keys, finite figures and the Markdown section; its full-size
DiT cases are the released Flux.1 dev and SD3.5 Large, which the released adapters' layouts fit."""
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import dit_step  # noqa: E402
import gpu  # noqa: E402


def explained(flat: dict, key: str) -> bool:
    """A ``None`` figure is allowed where a ``reason`` beside it, or above it, says why."""
    parts = key.split(".")
    if parts[-1] == "reason":
        return True
    return any(flat.get(".".join(parts[:depth] + ["reason"])) for depth in range(1, len(parts)))


@pytest.fixture(scope="module")
def dry_run(gpu_bench_dry_run):
    """The dry run, started in the background when the session was collected (tests/conftest.py)."""
    return gpu_bench_dry_run


def test_dry_run_has_the_gpu_runs_key_set(dry_run):
    report, _ = dry_run
    assert set(gpu.flatten(report)) == gpu.expected_keys()
    assert report["meta"]["errors"] == []
    assert report["meta"]["sections_done"] == gpu.all_parts()
    assert report["meta"]["small"] is True and report["meta"]["device"] == "cpu"


def test_every_figure_is_measured_and_finite(dry_run):
    report, _ = dry_run
    flat = gpu.flatten(report)
    assert gpu.non_finite(report) == []
    without_cubiq = {"meta.cubiq_dir", "meta.cubiq_gaps_filled"}
    unexplained = [key for key, value in flat.items() if value is None and key not in without_cubiq and not explained(flat, key)]
    assert unexplained == []
    for family in gpu.FAMILIES:
        for variant in gpu.inference_step.VARIANTS:
            assert report["inference"][family]["variants"][variant]["median_s"] > 0
    for family in gpu.DIT_FAMILIES:
        figures = report["inference"][family]
        assert figures["full_depth"] is True  # the dry run patches every block, at toy widths
        assert set(figures["variants"]) == set(dit_step.DIT_VARIANTS[family])
        for variant, one in figures["variants"].items():
            assert one["median_s"] > 0
            assert (one["output_change"] > 0) == (variant != "no_adapter")  # each adapter acts on the step it times
    assert report["inference"]["sd35"]["kv_per_step_s"] > 0
    assert report["training"]["sd15_base"]["speedup"] > 0
    assert all(report["training"][case]["reason"] for case in gpu.TRAINING_NOT_YET)
    assert report["patched_model_memory"]["clones_100"]["held_over_one_model"] == pytest.approx(1.0)


def test_markdown_section_is_written(dry_run):
    _, markdown = dry_run
    for heading in ("## GPU run", "### Goals", "### Inference", "### Image encoding", "### Training step", "### Memory of the patched model"):
        assert heading in markdown
    assert not re.search(r"\b(nan|inf)\b", markdown, re.IGNORECASE)
    assert all(f"{gpu.inference_step.FAMILIES[family].label}, " in markdown for family in gpu.FAMILIES)
    assert all(f"{dit_step.FAMILY_LABELS[family]}, " in markdown for family in gpu.DIT_FAMILIES)
    assert "step ratio, Flux.1 xlabs_v2 | ≤ 1.02×" in markdown and "step ratio, SD3.5 Large instantx | ≤ 1.02×" in markdown


@pytest.mark.parametrize("family, blocks, parameters", [
    ("flux", {"double_blocks": 19, "single_blocks": 38}, 11.90e9),
    ("sd35", {"joint_blocks": 38}, 8.06e9),
], ids=["flux", "sd35"])
def test_the_gpu_runs_dits_are_the_released_ones(family, blocks, parameters):
    """The GPU run's full-size DiTs, built on the meta device as it builds them: the released depth, widths and size, in
    bf16 without manual cast, and the released adapters' layouts (random, every layer) pass the Apply node's check."""
    from devtools.comfy_inprocess import pack_module

    shape = gpu.FULL.dit_shapes[family]
    assert shape == dit_step.RELEASED[family] and shape.full_depth and gpu.FULL.dit_latent == 128
    model = dit_step.dit_model(shape, torch.device("meta"), torch.bfloat16)
    diffusion_model = model.diffusion_model
    assert {name: len(getattr(diffusion_model, name)) for name in blocks} == blocks
    assert model.manual_cast_dtype is None and model.get_dtype() == torch.bfloat16
    assert sum(p.numel() for p in diffusion_model.parameters()) == pytest.approx(parameters, rel=0.005)
    patcher = pack_module("patcher")
    assert patcher.dit_width_and_heads(diffusion_model) == (shape.width, shape.heads)
    for variant in dit_step.DIT_VARIANTS[family][1:]:
        checkpoint = dit_step.random_checkpoint(shape, variant, seed=0)
        assert patcher.check_model_fits(diffusion_model, checkpoint).id == family
        assert dit_step.present_keys(checkpoint, diffusion_model) == list(checkpoint.spec.layer_keys)
        assert checkpoint.spec.num_tokens == {"xlabs_v2": 16, "instantx": 128 if family == "flux" else 64}[variant]
