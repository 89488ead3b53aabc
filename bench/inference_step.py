"""Cost of a sampling step with the adapter vs without, in a real ComfyUI, for SD1.5 and SDXL.

Full UNet architectures (random weights): SD1.5 at 512x512 (64x64 latent), SDXL at
1024x1024 (128x128 latent, with its added conditioning ``y``); CFG batch of 2. Variants:
no adapter, base (4 tokens), plus (16 tokens), two stacked base adapters; they run
interleaved, one UNet call each per repetition; the figure is the ratio of medians.
CUDA in fp16 when there is a GPU, else the CPU in fp32. Usage:

    python bench/inference_step.py [--family sd15|sdxl|both] [--reps 7] [--latent N] [--width 320] [--threads N]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd15", "sdxl", "both"), default="both")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--latent", type=int, default=0, help="latent side (0: the family's own, 64 for SD1.5, 128 for SDXL)")
    parser.add_argument("--width", type=int, default=FULL_WIDTH, help="UNet model_channels (320: full size)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cpu", action="store_true", help="the CPU even when there is a GPU")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = pick_device(args.cpu)
    print(f"machine: {device_name(device)}, {torch.get_num_threads()} torch threads, device {device}; torch {torch.__version__}")
    for family in ("sd15", "sdxl") if args.family == "both" else (args.family,):
        result = measure_family(family, args.width, args.latent or FAMILIES[family].latent, args.reps, device, dtype)
        print("\n".join(markdown_table(family, result)) + "\n", flush=True)


if __name__ == "__main__":
    main()
