"""Training step: the reference recipe's style vs our default, samples/s and peak memory.

Full-size SD1.5 UNet, VAE and text encoder and OpenCLIP ViT-H/14 (random weights), one optimiser
step per training step, for each adapter (``--adapter``, default both), built as the trainer builds it
(``training.variants.adapter_spec``):

- ``base`` (22.3M trainable parameters): the pooled image embedding [B, 1024] (``tutorial_train.py``);
- ``plus``: a Resampler on the encoder's penultimate hidden states [B, 257, 1280]
  (``tutorial_train_plus.py``: the reference runs ViT-H/14 with ``output_hidden_states`` every step
  and feeds ``hidden_states[-2]``; ours reads them from the cache, and the zero image's states, a
  dropped image's input, from the cache too).

- ``reference``: as the authors' training script: VAE, ViT-H/14 and text encoder run on
  every step (in the autocast dtype), the frozen UNet stays fp32 and the step runs under
  autocast (fp16 on GPU, bf16 on CPU), AdamW.
- ``reference-fp32``: the same without autocast (everything fp32): on CPUs without bf16
  instructions this is the faster way to run the reference, so ``ours`` vs this is the
  cache's own gain there.
- ``ours``: our trainer's step (``training.loop.compute_loss`` + ``Engine.step``) from
  cached encoder outputs (VAE moments, image embedding or penultimate states, text-encoder output), frozen
  models in ``model.frozen_dtype auto`` (bf16 on GPU, fp32 on CPU), SDPA, fused AdamW on GPU.
- ``ours-bf16``: ours with the frozen models in bf16 (the GPU default) on any device.

Each variant runs in its own process (so peak memory is its own); rounds of all variants
are interleaved ``--reps`` times and the figures are medians. Peak memory: on GPU
``torch.cuda.max_memory_allocated``; on CPU the process's resident high-water mark
(``VmHWM``, reset after the models are built, so it covers the training steps with the
weights the step keeps in memory). ``ours`` does not build the text and image encoders:
the trainer keeps them off the accelerator when training from the cache (they are only
used for sample grids). Data loading is not timed (with the cache, ours also skips
decoding and resizing the images).

    python bench/training_step.py [--adapter base plus] [--resolutions 512 256] [--batch 1] [--reps 3] [--steps 1] [--warmup 1] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from proc_memory import peak_bytes, reset_peak  # noqa: E402
from timing import building_on, device_name  # noqa: E402

VARIANTS = ("reference", "reference-fp32", "ours", "ours-bf16")
ADAPTERS = ("base", "plus")


def build_models(device, small: bool, encoders: bool):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ipadapter.encoder import build_vision_tower
    from training.models import SD15_CONFIG_DIR, FrozenModels, PromptTokenizer, build_embedded_models, family_scheduler

    if small:  # for trying the script out: the embedded default's scaled-down models
        frozen = build_embedded_models(seed=0)
        if not encoders:
            frozen.text_encoder = frozen.image_encoder = None
        return frozen
    torch.manual_seed(0)
    with building_on(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD15_CONFIG_DIR), subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(SD15_CONFIG_DIR), subfolder="vae"))
        text_encoder = image_encoder = None
        if encoders:
            text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(SD15_CONFIG_DIR / "text_encoder" / "config.json")))
            image_encoder = build_vision_tower("ViT-H-14")
    return FrozenModels(unet, vae, text_encoder, image_encoder, PromptTokenizer(), family_scheduler(), torch.float32)


def worker(variant: str, resolution: int, batch: int, steps: int, small: bool, warmup: int, adapter: str = "base") -> dict:
    import torch

    from training.adapter import IPAdapterModel
    from training.config import Config
    from training.distributed import Engine, Process
    from training.loop import SampleDraws, compute_loss
    from training.models import EMBEDDED_ENCODER, resolve_dtype
    from training.variants import adapter_spec

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    reference = variant.startswith("reference")
    frozen = build_models(device, small, encoders=reference)
    if variant == "ours":
        frozen.dtype = resolve_dtype("auto", device)
    elif variant == "ours-bf16":
        frozen.dtype = torch.bfloat16
    embed_dim, hidden_width = (EMBEDDED_ENCODER["embed_dim"], EMBEDDED_ENCODER["width"]) if small else (1024, 1280)
    tokens = (224 // 14) ** 2 + 1  # ViT-H/14 at 224 px (and the embedded tower): class token + 16 x 16 patches
    spec = adapter_spec(adapter, None, embed_dim, hidden_width, frozen.unet)
    model = IPAdapterModel(frozen.unet, spec=spec)
    for name in ("unet", "vae", "text_encoder", "image_encoder"):
        module = getattr(frozen, name)
        if module is None:
            continue
        module.to(device).requires_grad_(False).eval()
        if variant == "reference" and name != "unet":
            module.to(autocast_dtype)  # the reference casts VAE, text and image encoders; the UNet stays fp32
        elif not reference and frozen.dtype != torch.float32:
            module.to(frozen.dtype)
    model.to(device)
    config = Config()
    process = Process("single", 0, 1, 0, device)
    engine = Engine(model, config, process)
    if reference:  # the reference trains with torch's default AdamW (foreach), not fused
        engine.optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, weight_decay=0.01)

    generator = torch.Generator().manual_seed(0)
    latent = resolution // 8
    draws = SampleDraws(torch.ones(batch), [False] * batch, torch.randint(0, 1000, (batch,), generator=generator),
                        torch.randn(batch, 4, latent, latent, generator=generator), torch.randn(batch, 4, latent, latent, generator=generator))
    if reference:
        batch_data = {"pixels": torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1,
                      "clip_pixels": torch.randn(batch, 3, 224, 224, generator=generator),
                      "captions": ["a photo of a cat sitting on a red sofa, best quality"] * batch}
    else:  # what the cache holds, in the frozen dtype (compute_loss reads "image_embeds" or "penultimate")
        shape = (embed_dim,) if spec.encoder_input == "image_embeds" else (tokens, hidden_width)
        batch_data = {"moments": torch.randn(batch, 8, latent, latent, generator=generator).to(frozen.dtype),
                      spec.encoder_input: torch.randn(batch, *shape, generator=generator).to(frozen.dtype),
                      "text_embeds": torch.randn(batch, 77, 768, generator=generator).to(frozen.dtype),
                      "captions": [""] * batch}
        frozen.zero_image = torch.randn(tokens, hidden_width, generator=generator).to(frozen.dtype)  # the cache's, for plus

    def step() -> float:
        started = time.perf_counter()
        if variant == "reference":
            with torch.autocast(device.type, dtype=autocast_dtype):
                loss = compute_loss(engine, frozen, batch_data, draws, device)
        else:
            loss = compute_loss(engine, frozen, batch_data, draws, device)
        engine.step(loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for _ in range(warmup):  # first-call allocations, AdamW state
        step()
    reset_peak(device)
    times = [step() for _ in range(steps)]
    return {"seconds": statistics.median(times), "peak": peak_bytes(device), "device": str(device), "device_name": device_name(device),
            "trainable": model.num_trainable()}


def run_variant(variant: str, resolution: int, batch: int = 1, steps: int = 1, warmup: int = 1, threads: int = 0,
                small: bool = False, cpu: bool = False, adapter: str = "base") -> dict:
    """One variant's training steps in a fresh process (so that its peak memory is its own); ``cpu``: hide any GPU from it."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if cpu else None
    command = [sys.executable, __file__, "--worker", variant, "--adapter", adapter, "--resolution", str(resolution), "--batch", str(batch),
               "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)] + (["--small"] if small else [])
    output = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    line = next((l for l in output.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{adapter} {variant} at {resolution} failed:\n{output.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def compare(variants, resolutions, reps: int, adapters=("base",), **options) -> dict:
    """``{(adapter, resolution, variant): [result per round]}``: ``reps`` interleaved rounds of every adapter and variant.

    ``options`` go to :func:`run_variant` (batch, steps, warmup, threads, small, cpu).
    """
    results: dict = {}
    for rep in range(reps):
        for adapter in adapters:
            for resolution in resolutions:
                for variant in variants:
                    result = run_variant(variant, resolution, adapter=adapter, **options)
                    results.setdefault((adapter, resolution, variant), []).append(result)
                    print(f"# rep {rep + 1} {adapter} {resolution}px {variant}: {result['seconds']:.2f} s/step, "
                          f"peak {result['peak'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return results


def medians(runs: list[dict], batch: int) -> dict:
    """s/step, samples/s and peak memory of one variant: medians over its rounds."""
    seconds = statistics.median(r["seconds"] for r in runs)
    return {"s_per_step": seconds, "samples_per_s": batch / seconds, "peak_bytes": statistics.median(r["peak"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", nargs="+", default=list(ADAPTERS), choices=ADAPTERS, help="adapters to measure (default: both)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds of all variants (one process each)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per process, after one warm-up step")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process before the timed ones")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--small", action="store_true", help="scaled-down models, to try the script")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        result = worker(args.worker, args.resolution, args.batch, args.steps, args.small, args.warmup, args.adapter[0])
        print("RESULT " + json.dumps(result), flush=True)
        return

    started = time.time()
    adapters = list(dict.fromkeys(args.adapter))
    try:
        results = compare(args.variants, args.resolutions, args.reps, adapters=adapters, batch=args.batch, steps=args.steps,
                          warmup=args.warmup, threads=args.threads, small=args.small)
    except RuntimeError as error:
        raise SystemExit(str(error))
    first = next(iter(results.values()))[0]
    print(f"machine: {first['device_name']}, device {first['device']}, {torch.get_num_threads()} torch threads; torch {torch.__version__}")
    print(f"{'scaled-down' if args.small else 'full-size'} SD1.5 + ViT-H/14 (random weights), batch {args.batch}, "
          f"{args.reps} interleaved rounds x {args.steps} timed step(s) after {args.warmup} warm-up, medians; {time.time() - started:.0f} s in all")
    baseline = "reference" if "reference" in args.variants else args.variants[0]
    print(f"| adapter | trainable | resolution | variant | s/step | samples/s | peak memory (GiB) | samples/s vs {baseline} | peak vs {baseline} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for adapter in adapters:
        for resolution in args.resolutions:
            base = medians(results[(adapter, resolution, baseline)], args.batch)
            for variant in args.variants:
                runs = results[(adapter, resolution, variant)]
                figures = medians(runs, args.batch)
                print(f"| {adapter} | {runs[0]['trainable'] / 1e6:.1f}M | {resolution} | {variant} | {figures['s_per_step']:.2f} | "
                      f"{figures['samples_per_s']:.3f} | {figures['peak_bytes'] / 2**30:.2f} | "
                      f"{base['s_per_step'] / figures['s_per_step']:.2f}x | {figures['peak_bytes'] / base['peak_bytes']:.2f}x |")


if __name__ == "__main__":
    main()
