"""Cost of a sampling step with the adapter vs without, in a real ComfyUI, for SD1.5, SDXL, Flux.1 and SD3.5 Large.

Full UNet architectures (random weights): SD1.5 at 512x512 (64x64 latent), SDXL at
1024x1024 (128x128 latent, with its added conditioning ``y``); CFG batch of 2. Variants:
no adapter, base (4 tokens), plus (16 tokens), two stacked base adapters; they run
interleaved, one UNet call each per repetition; the figure is the ratio of medians.
CUDA in fp16 when there is a GPU, else the CPU in fp32.

``--family flux`` / ``sd35`` (or ``dit``, both): the DiTs at 1024x1024 (bench/dit_step.py): no adapter,
XLabs v2 and InstantX on Flux.1 (batch 1, cfg 1), InstantX on SD3.5 Large (CFG batch 2), the same
interleaved medians, one ``apply_model`` call per variant per repetition, a new σ per call. The released
widths; on a GPU the released depth (19 double + 38 single, 38 joint blocks) in bf16, on the CPU
``CPU_DIT_DEPTH`` blocks in fp32 (this CPU has no bf16 instructions); ``--double/--single/--blocks``
and ``--dtype`` change them. Usage:

    python bench/inference_step.py [--family sd15|sdxl|both|flux|sd35|dit] [--reps 7] [--warmup 1] [--latent N]
        [--width 320] [--double N --single N] [--blocks N] [--dtype auto|fp32|bf16|fp16] [--threads N] [--cpu]

The ComfyUI is $COMFYUI_PATH or the pinned copy the tests use (devtools/comfyui_setup.py).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # ipadapter and devtools

from timing import building_on, device_name, free_memory, interleaved, median, pick_device  # noqa: E402


@dataclass(frozen=True)
class Family:
    label: str
    context_dim: int  # width of the text tokens, and so of the image tokens
    latent: int  # latent side at the family's native resolution


FAMILIES = {"sd15": Family("SD1.5", 768, 64), "sdxl": Family("SDXL", 2048, 128)}
VARIANTS = ("no_adapter", "base", "plus", "two_stacked_base")
LABELS = {
    "no_adapter": "no adapter",
    "base": "base (4 tokens), λ = 1",
    "plus": "plus (16 tokens), λ = 1",
    "two_stacked_base": "two stacked base adapters",
}
TOKENS = {"base": 4, "plus": 16}
FULL_WIDTH = 320  # model_channels of both families' UNets


def import_comfy_for(device):
    """ComfyUI in this process (the harness keeps its device logic in CPU mode), attending as ComfyUI would on ``device``.

    ComfyUI picks PyTorch's SDPA on NVIDIA GPUs, but in CPU mode it would pick its sub-quadratic
    attention, which is slow on a GPU; the flag must be set before comfy.model_management loads.
    """
    from devtools.comfy_import import import_comfy
    from devtools.comfyui_setup import ensure_comfyui

    if device.type == "cuda" and "comfy.model_management" not in sys.modules:
        sys.path.insert(0, str(ensure_comfyui()))
        import comfy.cli_args

        comfy.cli_args.args.use_pytorch_cross_attention = True
    comfy = import_comfy()
    if device.type == "cuda" and not comfy.model_management.pytorch_attention_enabled():
        raise RuntimeError("comfy was imported before the benchmark could choose PyTorch attention for the GPU")
    return comfy


def build_model(family: str, width: int, device, dtype):
    """A ComfyUI ModelPatcher around a random UNet of the family, its UNet on ``device`` in ``dtype``."""
    from devtools.comfy_inprocess import build_sd15_model_patcher
    from devtools.sdxl_models import build_sdxl_model_patcher

    import_comfy_for(device)
    builder = build_sd15_model_patcher if family == "sd15" else build_sdxl_model_patcher
    with building_on(device):
        patcher = builder(width, seed=0)
    patcher.model.to(device)  # model_sampling's sigmas stay fp32
    patcher.model.diffusion_model.to(dtype)
    patcher.model.diffusion_model.dtype = dtype  # what apply_model casts its inputs to
    return patcher


def image_prompt_term(family: str, variant: str, width: int, seed: int):
    """The pack's image-prompt term of a random adapter, as the Apply node builds it."""
    import torch

    from devtools.adapter_factory import random_adapter
    from devtools.comfy_inprocess import pack_module
    from ipadapter.adapter_file import IPAdapterCheckpoint

    state = random_adapter(variant, base_width=width, seed=seed, family=family)
    checkpoint = IPAdapterCheckpoint.from_state_dicts(**state, base_width=width)
    generator = torch.Generator().manual_seed(seed)
    cond, uncond = (torch.randn(1, TOKENS[variant], FAMILIES[family].context_dim, generator=generator) for _ in range(2))
    weights = pack_module("ipadapter.weighting").layer_weights(checkpoint.spec.architecture, 1.0)
    return pack_module("patcher").ImagePromptTerm.build(checkpoint, cond, uncond, weights, 1e9, 0.0)


def adapter_variants(model, family: str, width: int) -> dict:
    """The model without adapter, with a base, with a plus, and with two stacked base adapters."""
    from devtools.comfy_inprocess import pack_module

    apply = pack_module("patcher").apply_image_prompt
    return {
        "no_adapter": model,
        "base": apply(model, image_prompt_term(family, "base", width, 1)),
        "plus": apply(model, image_prompt_term(family, "plus", width, 2)),
        "two_stacked_base": apply(apply(model, image_prompt_term(family, "base", width, 3)), image_prompt_term(family, "base", width, 4)),
    }


def unet_inputs(model, family: str, latent: int, device):
    """A CFG batch of 2 (latent, text context, SDXL's ``y``) and σ at t = 500, on ``device``."""
    from devtools.comfy_inprocess import UNetInputs, random_unet_inputs, sigma_at

    inputs = random_unet_inputs(model, FAMILIES[family].context_dim, batch=2, size=latent)
    on_device = UNetInputs(*(None if t is None else t.to(device) for t in (inputs.latent, inputs.context, inputs.y)))
    return on_device, sigma_at(model).to(device)


def measure_family(family: str, width: int, latent: int, reps: int, device, dtype, warmup: int = 1,
                   extra_variants: Callable | None = None) -> dict:
    """Median step time of each variant and its ratio to no adapter.

    ``extra_variants(model, family, width, device, dtype)`` may add variants (another pack's patches).
    """
    model = build_model(family, width, device, dtype)
    variants = adapter_variants(model, family, width)
    if extra_variants is not None:
        variants.update(extra_variants(model, family, width, device, dtype))
    inputs, sigma = unet_inputs(model, family, latent, device)
    steps = {name: (lambda patched=patched: inputs.predict(patched, sigma)) for name, patched in variants.items()}
    times = interleaved(steps, reps, device, warmup)
    baseline = median(times["no_adapter"])
    result = {
        "model_channels": width, "resolution": 8 * latent, "latent": latent, "batch": 2, "reps": reps,
        "dtype": str(dtype).replace("torch.", ""),
        "unet_parameters": sum(p.numel() for p in model.model.diffusion_model.parameters()),
        "variants": {name: {"median_s": median(values), "ratio": median(values) / baseline, "reason": None}
                     for name, values in times.items()},
    }
    del model, variants, steps
    free_memory(device)
    return result


def markdown_table(family: str, result: dict, labels: dict | None = None) -> list[str]:
    labels = {**LABELS, **(labels or {})}
    lines = [f"{FAMILIES[family].label}, {result['resolution']}x{result['resolution']} ({result['latent']}x{result['latent']} latent), "
             f"model_channels {result['model_channels']}, {result['dtype']}, batch 2 (cond+uncond), {result['reps']} interleaved reps",
             "",
             "| variant | median step (s) | ratio to no adapter |",
             "|---|---|---|"]
    for name, figures in result["variants"].items():
        if figures["median_s"] is None:
            lines.append(f"| {labels.get(name, name)} | – | – ({figures['reason']}) |")
        else:
            lines.append(f"| {labels.get(name, name)} | {figures['median_s']:.4f} | {figures['ratio']:.3f}× |")
    return lines


DIT_LATENT = 128  # 1024x1024, both DiTs' native size
CPU_DIT_DEPTH = {"flux": (1, 2), "sd35": (2, 0)}  # blocks on the CPU (Flux keeps its 1:2 double:single proportion)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dit_shape(family: str, device, double: int = 0, single: int = 0, blocks: int = 0):
    """The released widths at the released depth on a GPU, ``CPU_DIT_DEPTH`` on the CPU, unless the arguments say."""
    import dataclasses

    import dit_step

    shape = dit_step.RELEASED[family]
    if device.type == "cpu":
        shape = dataclasses.replace(shape, double=CPU_DIT_DEPTH[family][0], single=CPU_DIT_DEPTH[family][1])
    if family == "flux":
        return dataclasses.replace(shape, double=double or shape.double, single=single or shape.single)
    return dataclasses.replace(shape, double=blocks or shape.double)


def dit_dtype(device, choice: str = "auto"):
    """bf16 on a GPU (the DiTs' own dtype), fp32 on the CPU, unless ``choice`` names one."""
    import torch

    if choice != "auto":
        return getattr(torch, DTYPES[choice])
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd15", "sdxl", "both", "flux", "sd35", "dit"), default="both")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first")
    parser.add_argument("--latent", type=int, default=0,
                        help="latent side (0: the family's own, 64 for SD1.5, 128 for SDXL, Flux and SD3.5)")
    parser.add_argument("--width", type=int, default=FULL_WIDTH, help="UNet model_channels (320: full size)")
    parser.add_argument("--double", type=int, default=0, help="Flux double blocks (0: 19 on a GPU, %d on the CPU)" % CPU_DIT_DEPTH["flux"][0])
    parser.add_argument("--single", type=int, default=0, help="Flux single blocks (0: 38 on a GPU, %d on the CPU)" % CPU_DIT_DEPTH["flux"][1])
    parser.add_argument("--blocks", type=int, default=0, help="SD3.5 joint blocks (0: 38 on a GPU, %d on the CPU)" % CPU_DIT_DEPTH["sd35"][0])
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="auto: UNets fp16 on a GPU, DiTs bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cpu", action="store_true", help="the CPU even when there is a GPU")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = pick_device(args.cpu)
    print(f"machine: {device_name(device)}, {torch.get_num_threads()} torch threads, device {device}; torch {torch.__version__}")
    families = {"both": ("sd15", "sdxl"), "dit": ("flux", "sd35")}.get(args.family, (args.family,))
    for family in families:
        if family in FAMILIES:
            unet_dtype = dtype if args.dtype == "auto" else dit_dtype(device, args.dtype)
            result = measure_family(family, args.width, args.latent or FAMILIES[family].latent, args.reps, device, unet_dtype,
                                    args.warmup)
            lines = markdown_table(family, result)
        else:
            import dit_step

            shape = dit_shape(family, device, args.double, args.single, args.blocks)
            result = dit_step.measure(shape, args.latent or DIT_LATENT, args.reps, device, dit_dtype(device, args.dtype), args.warmup)
            lines = dit_step.markdown_table(family, result)
        print("\n".join(lines) + "\n", flush=True)


if __name__ == "__main__":
    main()
