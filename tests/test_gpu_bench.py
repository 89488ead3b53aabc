"""bench/gpu.py's CPU dry run writes the GPU run's JSON keys, finite figures and the Markdown section."""
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

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
    assert report["training"]["sd15_base"]["speedup"] > 0
    assert all(report["training"][case]["reason"] for case in gpu.TRAINING_NOT_YET)
    assert report["patched_model_memory"]["clones_100"]["held_over_one_model"] == pytest.approx(1.0)


def test_markdown_section_is_written(dry_run):
    _, markdown = dry_run
    for heading in ("## GPU run", "### Goals", "### Inference", "### Image encoding", "### Training step", "### Memory of the patched model"):
        assert heading in markdown
    assert not re.search(r"\b(nan|inf)\b", markdown, re.IGNORECASE)
    assert all(f"{gpu.inference_step.FAMILIES[family].label}, " in markdown for family in gpu.FAMILIES)
