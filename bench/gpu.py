"""Every figure a lent GPU should give, in one run (issue 16).

Sections, in this order (each reuses its own benchmark module):

- ``memory``: peak memory of a patched SD1.5 model (base + plus applied) over 1, 10 and
  100 clones (bench/patched_model_memory.py);
- ``inference``: a sampling step with the adapter vs without, SD1.5 at 512² and SDXL at
  1024², CFG batch 2: base, plus, two stacked base adapters, and with ``--cubiq DIR``
  the same through cubiq's IPAdapterAdvanced (bench/inference_step.py, bench/cubiq_pack.py);
  then Flux.1 (19 double + 38 single blocks, batch 1 at cfg 1) with XLabs v2 and InstantX, and
  SD3.5 Large (38 joint blocks, CFG batch 2) with InstantX, both at 1024² in bf16 (bench/dit_step.py);
- ``encoding``: image encoding time per reference, ViT-H/14 and ViT-bigG/14, batch 1 and 8
  (bench/image_encoding.py);
- ``training``: a training step, the reference's style vs ours from the cache, base and plus,
  SD1.5 at 512 and SDXL at 1024 (full-size UNets; bench/training_step.py), then Flux.1 XLabs v2 and SD3.5 Large
  InstantX at 512 (the released transformers, blocks recomputed, bf16; bench/dit_training_step.py), one part per case.

On a GPU: full-size architectures with random weights in fp16, the DiTs in bf16 (training: the reference
under fp16 autocast over an fp32 UNet, ours with a bf16 frozen UNet). ``--cpu --small``:
the same sections on the CPU with scaled-down models and sizes (the DiTs at toy widths with every
block), writing the same JSON keys
(:func:`expected_keys`). Writes ``gpu_bench.json`` and ``gpu_bench.md`` (a Markdown
section for BENCHMARKS.md) to ``--out``, else ``$OUT``, else ``bench-out/``, rewritten
after every part (a section, or one family or encoder of it) so that a run cut short or a
part that fails keeps the other figures; failures are listed in ``meta.errors``. Usage:

    python bench/gpu.py [--out DIR] [--cpu] [--small] [--cubiq DIR] [--sections memory inference encoding training]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import dit_step  # noqa: E402
import inference_step  # noqa: E402
from timing import device_name, free_memory, pick_device  # noqa: E402
from cubiq_pack import CUBIQ_LABELS, CUBIQ_VARIANTS  # noqa: E402

SECTIONS = ("memory", "inference", "encoding", "training")
FAMILIES = tuple(inference_step.FAMILIES)  # the UNets
DIT_FAMILIES = (dit_step.FLUX, dit_step.SD35)
INFERENCE_VARIANTS = inference_step.VARIANTS + CUBIQ_VARIANTS
ENCODERS = ("ViT-H-14", "ViT-bigG-14")
ENCODING_BATCHES = (1, 8)
TRAINING_VARIANTS = ("reference", "ours")
TRAINING_NOT_YET: dict = {}  # case -> why it has no figures yet (none now: the trainer runs every case)
TRAINING_CASES = ("sd15_base", "sdxl_base", "sd15_plus", "sdxl_plus",  # {family}_{adapter}, in the order they run
                  "flux_xlabs", "sd35_instantx")  # the DiTs at the released depth in bf16 (bench/dit_training_step.py)
CLONE_COUNTS = (1, 10, 100)
GOALS = {"inference_ratio": 1.01, "dit_inference_ratio": 1.02, "training_speedup": 3.0, "training_peak_ratio": 0.6}
NO_CUBIQ = "not run: pass --cubiq DIR (a local copy of cubiq's ComfyUI_IPAdapter_plus)"


@dataclass(frozen=True)
class Sizes:
    unet_width: int  # model_channels of both UNets
    latents: dict  # family -> latent side
    inference_reps: int
    inference_warmup: int
    small_towers: bool
    encoding_reps: int
    training_resolution: dict  # family -> px
    training_reps: int
    training_steps: int
    training_warmup: int
    dit_shapes: dict  # family -> dit_step.Shape
    dit_latent: int
    dit_reps: int
    dit_warmup: int


FULL = Sizes(320, {"sd15": 64, "sdxl": 128}, 40, 3, False, 10, {"sd15": 512, "sdxl": 1024, "flux": 512, "sd35": 512}, 2, 5, 2,
             dit_step.RELEASED, 128, 20, 2)
SMALL = Sizes(32, {"sd15": 16, "sdxl": 16}, 3, 1, True, 2, {"sd15": 64, "sdxl": 64, "flux": 32, "sd35": 32}, 1, 1, 1,
              dit_step.TINY, 8, 2, 1)


# --- the JSON's key set ---------------------------------------------------------------

def nulls(*names: str) -> dict:
    return dict.fromkeys(names)


def dit_skeleton(family: str) -> dict:
    """One DiT's inference figures (``dit_step.measure``'s keys)."""
    return {
        **nulls("width", "heads", "double_blocks", "single_blocks", "full_depth", "resolution", "latent", "image_tokens",
                "text_tokens", "batch", "reps", "dtype", "parameters"),
        **(nulls("kv_per_step_s") if family == dit_step.SD35 else {}),
        "variants": {variant: nulls("median_s", "ratio", "output_change", "reason") for variant in dit_step.DIT_VARIANTS[family]},
    }


def skeleton() -> dict:
    """The report's structure with every figure ``None``: a GPU run and a CPU dry run fill the same keys."""
    return {
        "meta": nulls("device", "device_name", "torch", "python", "small", "dtype", "started_utc", "wall_seconds",
                      "cubiq_dir", "cubiq_gaps_filled", "command", "sections_done", "errors"),
        "patched_model_memory": {
            **nulls("model_channels", "dtype", "memory_measure", "one_model_adapter_bytes", "one_model_storages"),
            "copied_clone": nulls("storage_bytes", "memory_added_bytes"),
            **{f"clones_{count}": nulls("adapter_tensors_bytes", "if_copied_bytes", "held_over_one_model", "memory_added_bytes",
                                        "peak_bytes", "unet_shared", "peak_over_first") for count in CLONE_COUNTS},
        },
        "inference": {family: {
            **nulls("model_channels", "resolution", "latent", "batch", "reps", "dtype", "unet_parameters"),
            "variants": {variant: nulls("median_s", "ratio", "reason") for variant in INFERENCE_VARIANTS},
        } for family in FAMILIES} | {family: dit_skeleton(family) for family in DIT_FAMILIES},
        "image_encoding": {name: {
            **nulls("parameters", "image_size", "dtype", "reps"),
            **{f"batch_{batch}": nulls("median_s_per_image", "ratio_to_batch_1") for batch in ENCODING_BATCHES},
        } for name in ENCODERS},
        "training": {case: {
            **nulls("resolution", "batch", "reps", "steps", "speedup", "peak_ratio", "reason"),
            **{variant: nulls("s_per_step", "samples_per_s", "peak_bytes") for variant in TRAINING_VARIANTS},
        } for case in TRAINING_CASES},
    }


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a.b.c": leaf}``; lists are leaves."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def expected_keys() -> set[str]:
    """The dotted key set of every run's JSON, GPU or CPU dry run."""
    return set(flatten(skeleton()))


def non_finite(report: dict) -> list[str]:
    """Keys of figures that are NaN or infinite (for the tests, and a first look at a GPU run's file)."""
    return [key for key, value in flatten(report).items() if isinstance(value, float) and not math.isfinite(value)]


SECTION_KEYS = {"memory": "patched_model_memory", "inference": "inference", "encoding": "image_encoding", "training": "training"}


# --- sections -----------------------------------------------------------------------

def memory_part(part, sizes: Sizes, device, dtype, options) -> dict:
    from patched_model_memory import measure_clones

    return measure_clones(CLONE_COUNTS, sizes.unet_width, device, dtype)


def dit_dtype(device, dtype):
    """The DiTs' own bf16 on a GPU; the CPU's fp32 in the dry run."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else dtype


def inference_part(family: str, sizes: Sizes, device, dtype, options) -> dict:
    if family in DIT_FAMILIES:
        result = dit_step.measure(sizes.dit_shapes[family], sizes.dit_latent, sizes.dit_reps, device, dit_dtype(device, dtype),
                                  sizes.dit_warmup)
        progress(f"inference {family}: " + ", ".join(f"{name} {figures['ratio']:.3f}x" for name, figures in result["variants"].items()))
        return result
    extra = options.cubiq.variants if options.cubiq else None
    result = inference_step.measure_family(family, sizes.unet_width, sizes.latents[family], sizes.inference_reps, device, dtype,
                                           sizes.inference_warmup, extra)
    if not options.cubiq:
        result["variants"].update({variant: {"median_s": None, "ratio": None, "reason": NO_CUBIQ} for variant in CUBIQ_VARIANTS})
    progress(f"inference {family}: " + ", ".join(f"{name} {figures['ratio']:.3f}x" for name, figures in result["variants"].items()
                                                 if figures["ratio"] is not None))
    return result


def encoding_part(name: str, sizes: Sizes, device, dtype, options) -> dict:
    from image_encoding import encoding_times

    return encoding_times(name, sizes.small_towers, ENCODING_BATCHES, sizes.encoding_reps, device, dtype)


def training_part(case: str, sizes: Sizes, device, dtype, options) -> dict:
    from training_step import compare, medians

    family, adapter = case.split("_")
    resolution = sizes.training_resolution[family]
    if family in ("flux", "sd35"):  # from the cache vs encoders every step, the released depth on a GPU
        from dit_training_step import measure

        figures = measure(family, resolution, sizes.training_reps, sizes.training_steps, sizes.training_warmup,
                          options.threads, options.small, full_depth=not options.small, cpu=device.type == "cpu")
        reference, ours = figures["reference"], figures["ours"]
        return {"resolution": resolution, "batch": 1, "reps": sizes.training_reps, "steps": sizes.training_steps,
                "speedup": ours["samples_per_s"] / reference["samples_per_s"],
                "peak_ratio": ours["peak_bytes"] / reference["peak_bytes"], "reason": None, **figures}
    results = compare(TRAINING_VARIANTS, [resolution], sizes.training_reps, adapters=(adapter,), families=(family,), batch=1,
                      steps=sizes.training_steps, warmup=sizes.training_warmup, threads=options.threads, small=options.small,
                      cpu=device.type == "cpu")
    reference, ours = (medians(results[(family, adapter, resolution, variant)], 1) for variant in TRAINING_VARIANTS)
    progress(f"training {case}: {ours['samples_per_s'] / reference['samples_per_s']:.2f}x samples/s, "
             f"{ours['peak_bytes'] / reference['peak_bytes']:.2f}x peak")
    return {"resolution": resolution, "batch": 1, "reps": sizes.training_reps, "steps": sizes.training_steps,
            "speedup": ours["samples_per_s"] / reference["samples_per_s"], "peak_ratio": ours["peak_bytes"] / reference["peak_bytes"],
            "reason": None, "reference": reference, "ours": ours}


# section -> (its function, the parts it runs one at a time: one part's failure keeps the others' figures)
SECTION_PARTS = {
    "memory": (memory_part, (None,)),
    "inference": (inference_part, FAMILIES + DIT_FAMILIES),
    "encoding": (encoding_part, ENCODERS),
    "training": (training_part, TRAINING_CASES),
}


# --- the Markdown -------------------------------------------------------------------

def figure(value, pattern: str = "{:.3f}") -> str:
    return "–" if value is None else pattern.format(value)


def goals_table(report: dict) -> list[str]:
    lines = ["| figure | goal | measured | met |", "|---|---|---|---|"]

    def row(name: str, value, goal: float, at_most: bool) -> None:
        met = "–" if value is None else ("yes" if (value <= goal if at_most else value >= goal) else "**no**")
        lines.append(f"| {name} | {'≤' if at_most else '≥'} {goal}× | {figure(value)}{'' if value is None else '×'} | {met} |")

    for family in FAMILIES:
        for variant in INFERENCE_VARIANTS:
            value = report["inference"][family]["variants"][variant]["ratio"]
            if variant != "no_adapter" and (value is not None or variant not in CUBIQ_VARIANTS):
                row(f"step ratio, {inference_step.FAMILIES[family].label} {variant}", value, GOALS["inference_ratio"], True)
    for family in DIT_FAMILIES:
        for variant, figures in report["inference"][family]["variants"].items():
            if variant != "no_adapter":
                row(f"step ratio, {dit_step.FAMILY_LABELS[family]} {variant}", figures["ratio"], GOALS["dit_inference_ratio"], True)
    for case in TRAINING_CASES:  # the goals are the UNet trainer's; the DiT cases report their figures only
        figures = report["training"][case]
        if figures["reason"] is None and case.split("_")[0] in FAMILIES:
            row(f"training samples/s vs reference, {case}", figures["speedup"], GOALS["training_speedup"], False)
            row(f"training peak memory vs reference, {case}", figures["peak_ratio"], GOALS["training_peak_ratio"], True)
    return lines


def training_table(training: dict, cases) -> list[str]:
    lines = ["| case | px | variant | s/step | samples/s | peak memory (GiB) | samples/s vs reference | peak vs reference |",
             "|---|---|---|---|---|---|---|---|"]
    for case in cases:
        figures = training[case]
        if figures["reason"] is not None:
            lines.append(f"| {case} | – | – | – | – | – | – | – ({figures['reason']}) |")
            continue
        for variant in TRAINING_VARIANTS:
            one = figures[variant]
            ours = variant == "ours"
            lines.append(f"| {case} | {figures['resolution']} | {variant} | {one['s_per_step']:.4f} | {one['samples_per_s']:.3f} | "
                         f"{one['peak_bytes'] / 2**30:.2f} | {figure(figures['speedup'], '{:.2f}') if ours else '1.00'}× | "
                         f"{figure(figures['peak_ratio'], '{:.2f}') if ours else '1.00'}× |")
    return lines


def markdown(report: dict) -> str:
    from image_encoding import encoding_table
    from patched_model_memory import markdown_table as memory_table

    meta = report["meta"]
    families = [family for family in FAMILIES if done(meta, "inference", family)]
    dit_families = [family for family in DIT_FAMILIES if done(meta, "inference", family)]
    encoders = [name for name in ENCODERS if done(meta, "encoding", name)]
    training_cases = [case for case in TRAINING_CASES if done(meta, "training", case)]
    lines = [f"## GPU run: {meta['device_name']} ({meta['device']}), {meta['started_utc'][:10]}", "",
             f"- Command: `{meta['command']}`{' (scaled-down models: a dry run, not figures to quote)' if meta['small'] else ''}",
             f"- torch {meta['torch']}, Python {meta['python']}, {meta['dtype']}; {meta['wall_seconds']:.0f} s in all; "
             f"sections: {', '.join(meta['sections_done']) or 'none'}"]
    if meta["cubiq_dir"]:
        lines.append(f"- cubiq's pack: `{meta['cubiq_dir']}`; ComfyUI gaps filled for it (outside the timed step): "
                     f"{', '.join(meta['cubiq_gaps_filled']) or 'none'}")
    lines += [f"- Error: {error}" for error in meta["errors"]]
    lines += ["", "### Goals", ""] + goals_table(report)
    if families or dit_families:
        lines += ["", "### Inference: sampling step with the adapter vs without (goals ≤ 1.01× SD1.5/SDXL, ≤ 1.02× Flux/SD3.5)"]
        for family in families:
            lines += [""] + inference_step.markdown_table(family, report["inference"][family], CUBIQ_LABELS)
        for family in dit_families:
            lines += [""] + dit_step.markdown_table(family, report["inference"][family])
    if encoders:
        lines += ["", "### Image encoding per reference image"]
        for name in encoders:
            lines += [""] + encoding_table(name, meta["small"], report["image_encoding"][name], meta["device"])
    if training_cases:
        lines += ["", "### Training step: reference style vs ours from the cache (goals ≥ 3× samples/s, ≤ 0.6× peak memory)", "",
                  "Reference: VAE, ViT-H/14 and text encoder(s) every step (SDXL: CLIP-L and bigG, its VAE fp32 outside "
                  "autocast), frozen UNet fp32 under autocast; ours: cached encoder outputs, frozen UNet in bf16 on a GPU "
                  "(fp32 on the CPU). Full-size UNets; peak: `torch.cuda.max_memory_allocated` (CPU: VmHWM), each variant "
                  "in its own process.", ""] + training_table(report["training"], training_cases)
    if done(meta, "memory"):
        lines += ["", "### Memory of the patched model over clones", ""] + memory_table(report["patched_model_memory"])
    return "\n".join(lines) + "\n"


# --- the run ------------------------------------------------------------------------

def progress(message: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def output_folder(out: str | None) -> Path:
    folder = Path(out or os.environ.get("OUT") or "bench-out")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_report(report: dict, folder: Path, started: float) -> None:
    report["meta"]["wall_seconds"] = time.time() - started
    (folder / "gpu_bench.json").write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    (folder / "gpu_bench.md").write_text(markdown(report))


def part_name(section: str, part) -> str:
    return section if part is None else f"{section}.{part}"


def key_mismatch(name: str, template: dict, result: dict) -> str | None:
    want, got = set(flatten(template)), set(flatten(result))
    if want == got:
        return None
    return f"{name}: keys differ from the GPU run's: missing {sorted(want - got)[:5]}, extra {sorted(got - want)[:5]}"


def run_part(section: str, part, report: dict, sizes: Sizes, device, dtype, options) -> None:
    name = part_name(section, part)
    progress(f"{name} ...")
    started = time.time()
    function, _ = SECTION_PARTS[section]
    try:
        result = function(part, sizes, device, dtype, options)
    except Exception as error:  # one part's failure must not lose the others' figures
        traceback.print_exc()
        report["meta"]["errors"].append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        return
    finally:
        free_memory(device)
    key = SECTION_KEYS[section]
    template = skeleton()[key] if part is None else skeleton()[key][part]
    mismatch = key_mismatch(name, template, result)
    if mismatch:
        report["meta"]["errors"].append(mismatch)
    if part is None:
        report[key] = result
    else:
        report[key][part] = result
    report["meta"]["sections_done"].append(name)
    progress(f"{name} done in {time.time() - started:.0f} s")


def all_parts(sections=SECTIONS) -> list[str]:
    """What a full run reports in ``meta.sections_done``: "memory", "inference.sd15", ..."""
    return [part_name(section, part) for section in sections for part in SECTION_PARTS[section][1]]


def done(meta: dict, section: str, part=None) -> bool:
    return part_name(section, part) in meta["sections_done"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for gpu_bench.json and gpu_bench.md (default: $OUT, else bench-out)")
    parser.add_argument("--cpu", action="store_true", help="the CPU even when there is a GPU (fp32)")
    parser.add_argument("--small", action="store_true", help="scaled-down models and sizes: a dry run in a minute or two")
    parser.add_argument("--cubiq", metavar="DIR", help="a local copy of cubiq's ComfyUI_IPAdapter_plus: also time its IPAdapterAdvanced")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser.parse_args(argv)


def run_metadata(options, argv, device, dtype) -> dict:
    import torch

    return dict(device=device.type, device_name=device_name(device), torch=torch.__version__, python=platform.python_version(),
                small=options.small, dtype=str(dtype).replace("torch.", ""),
                started_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                cubiq_dir=str(options.cubiq.folder) if options.cubiq else None,
                cubiq_gaps_filled=options.cubiq.gaps_filled if options.cubiq else None,
                command="python bench/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv), sections_done=[], errors=[])


def main(argv=None) -> int:
    options = parse_args(argv)
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    device, dtype = pick_device(options.cpu)
    sizes = SMALL if options.small else FULL
    if options.cubiq:
        from cubiq_pack import CubiqPack

        options.cubiq = CubiqPack.load(options.cubiq, device)  # exits with a one-line message if it cannot be wired
    folder = output_folder(options.out)
    started = time.time()
    report = skeleton()
    report["meta"].update(run_metadata(options, argv, device, dtype))
    for section in options.sections:
        for part in SECTION_PARTS[section][1]:
            run_part(section, part, report, sizes, device, dtype, options)
            write_report(report, folder, started)
    write_report(report, folder, started)
    errors = report["meta"]["errors"]
    progress(f"wrote {folder / 'gpu_bench.json'} and {folder / 'gpu_bench.md'} in {time.time() - started:.0f} s"
             + (f"; {len(errors)} error(s)" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
