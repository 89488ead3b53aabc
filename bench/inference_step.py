"""Cost of a sampling step with the adapter vs without, in a real ComfyUI.

Full SD1.5 UNet architecture (random weights), 512x512 (64x64 latent), CFG
batch of 2. Variants run interleaved, one UNet call each per repetition; the
figure is the ratio of medians. Usage:

    python bench/inference_step.py [--reps 7] [--latent 64] [--threads N]

The ComfyUI is $COMFYUI_PATH or the pinned test copy (tests/comfyui_setup.py).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 pixels)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from adapter_factory import random_adapter
    from comfy_inprocess import build_sd15_model_patcher, noise_prediction, pack_module
    from ipadapter.checkpoint import IPAdapterCheckpoint

    patcher_module = pack_module("patcher")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_sd15_model_patcher(320, seed=0)
    model.model.to(device)

    def term(variant: str, seed: int):
        checkpoint = IPAdapterCheckpoint.from_state_dicts(**random_adapter(variant, seed=seed))
        tokens = 4 if variant == "base" else 16
        generator = torch.Generator().manual_seed(seed)
        cond, uncond = (torch.randn(1, tokens, 768, generator=generator) for _ in range(2))
        return patcher_module.ImagePromptTerm.build(checkpoint, cond, uncond, 1.0, {}, 1e9, 0.0)

    variants = {
        "no adapter": model,
        "base (4 tokens)": patcher_module.apply_image_prompt(model, term("base", 1)),
        "plus (16 tokens)": patcher_module.apply_image_prompt(model, term("plus", 2)),
        "two stacked base": patcher_module.apply_image_prompt(patcher_module.apply_image_prompt(model, term("base", 3)), term("base", 4)),
    }
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, args.latent, args.latent, generator=generator).to(device)
    context = torch.randn(2, 77, 768, generator=generator).to(device)
    sigma = model.model.model_sampling.sigmas[500].expand(2).clone().to(device)

    def step(patched):
        start = time.perf_counter()
        noise_prediction(patched, latent, sigma, context)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for patched in variants.values():  # warm-up: first-call allocations, K'/V' device copies
        step(patched)
    times = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, patched in variants.items():
            times[name].append(step(patched))

    base = statistics.median(times["no adapter"])
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, device {device}")
    print(f"torch {torch.__version__}; SD1.5 UNet (random), latent {args.latent}x{args.latent}, batch 2 (cond+uncond), {args.reps} interleaved reps")
    print("| variant | median step (s) | ratio to no adapter |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / base:.3f}x |")


if __name__ == "__main__":
    main()
