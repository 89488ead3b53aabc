"""Training step: the reference recipe's style vs our default, samples/s and peak memory.

Full-size base models (``--family``: SD1.5's UNet, VAE and CLIP-L text encoder; SDXL base's UNet, VAE
and CLIP-L + OpenCLIP bigG text encoders) and OpenCLIP ViT-H/14, random weights, one optimiser
step per training step, for each adapter (``--adapter``, default both), built as the trainer builds it
(``training.variants.adapter_spec``; SDXL plus: a Resampler 1280 wide, 20 heads):

- ``base`` (SD1.5: 22.3M trainable parameters): the pooled image embedding [B, 1024] (``tutorial_train.py``);
- ``plus``: a Resampler on the encoder's penultimate hidden states [B, 257, 1280]
  (``tutorial_train_plus.py``: the reference runs ViT-H/14 with ``output_hidden_states`` every step
  and feeds ``hidden_states[-2]``; ours reads them from the cache, and the zero image's states, a
  dropped image's input, from the cache too).

- ``reference``: as the authors' training script: VAE, ViT-H/14 and text encoder(s) run on
  every step (in the autocast dtype; SDXL's VAE in fp32, outside autocast, as ``tutorial_train_sdxl.py``),
  the frozen UNet stays fp32 and the step runs under autocast (fp16 on GPU, bf16 on CPU), AdamW.
- ``reference-fp32``: the same without autocast (everything fp32): on CPUs without bf16
  instructions this is the faster way to run the reference, so ``ours`` vs this is the
  cache's own gain there.
- ``ours``: our trainer's step (``training.loop.compute_loss`` + ``Engine.step``) from
  cached encoder outputs (VAE moments, image embedding or penultimate states, text-encoder output; SDXL: and
  the pooled text, original size and crop for the time ids), frozen
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

``--unet-width`` narrows the UNet (channels of its first block; default the family's 320, full size) with the
family's block layout (``training.models.build_embedded_unet``), encoders and VAE staying full size: full-size
SDXL training does not fit a 24 GiB host in fp32.

    python bench/training_step.py [--family sd15 sdxl | flux sd35] [--adapter base plus] [--resolutions 512 256] [--unet-width W]
                                  [--batch 1] [--reps 3] [--steps 1] [--warmup 1] [--threads N]
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
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from proc_memory import peak_bytes, reset_peak  # noqa: E402
from timing import building_on, device_name  # noqa: E402

VARIANTS = ("reference", "reference-fp32", "ours", "ours-bf16")
ADAPTERS = ("base", "plus")


class Family(NamedTuple):
    fp32_vae: bool  # the reference keeps the VAE fp32, outside autocast (tutorial_train_sdxl.py)


FAMILIES = {"sd15": Family(False), "sdxl": Family(True)}
DIT_FAMILIES = ("flux", "sd35")  # measured by bench/dit_training_step.py


def build_models(device, small: bool, encoders: bool, family: str = "sd15", unet_width: int | None = None):
    """The frozen models of ``family`` (random weights; ``encoders`` False: without text and image encoders), the UNet
    ``unet_width`` channels wide in its first block (None: the family's own)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ipadapter.encoder import build_vision_tower
    from ipadapter.registry import family_by_id
    from training.base_models import config_dir, text_encoder_class
    from training.models import (FrozenModels, build_embedded_models, build_embedded_unet, family_scheduler, seeded,
                                 tokenizers_for)

    architecture = family_by_id(family)
    if small:  # for trying the script out: the embedded default's scaled-down models
        frozen = build_embedded_models(architecture, seed=0)
        if unet_width:
            with seeded(0):
                frozen.unet = build_embedded_unet(architecture, unet_width)
        if not encoders:
            frozen.image_encoder = None
            frozen.text_encoders = dict.fromkeys(frozen.text_encoders)
        return frozen
    folder = config_dir(architecture)
    torch.manual_seed(0)
    with building_on(device):
        if unet_width in (None, architecture.base_width):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder), subfolder="unet"))
        else:
            unet = build_embedded_unet(architecture, unet_width)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder), subfolder="vae"))
        texts = {encoder.folder: None for encoder in architecture.training.text_encoders}
        image_encoder = None
        if encoders:
            for encoder in architecture.training.text_encoders:
                model_class = text_encoder_class(encoder)
                config = model_class.config_class.from_json_file(str(folder / encoder.folder / "config.json"))
                texts[encoder.folder] = model_class(config)
            image_encoder = build_vision_tower("ViT-H-14")
    return FrozenModels(unet, vae, texts, image_encoder, tokenizers_for(architecture), family_scheduler(architecture),
                        torch.float32, architecture)


def worker(variant: str, resolution: int, batch: int, steps: int, small: bool, warmup: int, adapter: str = "base",
           family: str = "sd15", unet_width: int | None = None) -> dict:
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
    fp32_vae = FAMILIES[family].fp32_vae
    kept_fp32 = ("unet", "vae") if fp32_vae else ("unet",)
    frozen = build_models(device, small, reference, family, unet_width)
    context_width, pooled_width = frozen.family.context_dim, frozen.family.training.pooled_width
    if variant == "ours":
        frozen.dtype = resolve_dtype("auto", device)
    elif variant == "ours-bf16":
        frozen.dtype = torch.bfloat16
    embed_dim, hidden_width = (EMBEDDED_ENCODER["embed_dim"], EMBEDDED_ENCODER["width"]) if small else (1024, 1280)
    tokens = (224 // 14) ** 2 + 1  # ViT-H/14 at 224 px (and the embedded tower): class token + 16 x 16 patches
    spec = adapter_spec(adapter, None, embed_dim, hidden_width, frozen.unet)
    model = IPAdapterModel(frozen.unet, spec=spec)
    for name, module in frozen.modules().items():
        if module is None:
            continue
        module.to(device).requires_grad_(False).eval()
        if variant == "reference" and name not in kept_fp32:
            module.to(autocast_dtype)  # the reference casts VAE (not SDXL's), text and image encoders; the UNet stays fp32
        elif not reference and frozen.dtype != torch.float32:
            module.to(frozen.dtype)
    model.to(device)
    config = Config()
    process = Process("single", 0, 1, 0, device)
    engine = Engine(model, config, process)
    if reference:  # the reference trains with torch's default AdamW (foreach), not fused
        engine.optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, weight_decay=0.01)
    if variant == "reference" and fp32_vae:  # tutorial_train_sdxl.py encodes with its fp32 VAE outside autocast
        frozen.encode_moments = torch.autocast(device.type, enabled=False)(frozen.encode_moments)

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
                      "text_embeds": torch.randn(batch, 77, context_width, generator=generator).to(frozen.dtype),
                      "captions": [""] * batch}
        if pooled_width:
            batch_data["pooled_text"] = torch.randn(batch, pooled_width, generator=generator).to(frozen.dtype)
        frozen.zero_image = torch.randn(tokens, hidden_width, generator=generator).to(frozen.dtype)  # the cache's, for plus
    if pooled_width:  # SDXL's time ids: the image's original size and crop (the target size is the resolution)
        batch_data.update(original_size=torch.tensor([[resolution, resolution]] * batch), crop_top_left=torch.zeros(batch, 2, dtype=torch.long))

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
            "trainable": model.num_trainable(), "unet_parameters": sum(p.numel() for p in frozen.unet.parameters()),
            "unet_width": frozen.unet.config.block_out_channels[0]}


def run_variant(variant: str, resolution: int, batch: int = 1, steps: int = 1, warmup: int = 1, threads: int = 0,
                small: bool = False, cpu: bool = False, adapter: str = "base", family: str = "sd15", unet_width: int | None = None) -> dict:
    """One variant's training steps in a fresh process (so that its peak memory is its own); ``cpu``: hide any GPU from it."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if cpu else None
    command = [sys.executable, __file__, "--worker", variant, "--family", family, "--adapter", adapter, "--resolution", str(resolution),
               "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)]
    command += (["--small"] if small else []) + (["--unet-width", str(unet_width)] if unet_width else [])
    output = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    line = next((l for l in output.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{family} {adapter} {variant} at {resolution} failed:\n{output.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def compare(variants, resolutions, reps: int, adapters=("base",), families=("sd15",), **options) -> dict:
    """``{(family, adapter, resolution, variant): [result per round]}``: ``reps`` interleaved rounds of every family,
    adapter and variant.

    ``options`` go to :func:`run_variant` (batch, steps, warmup, threads, small, cpu, unet_width).
    """
    results: dict = {}
    for rep in range(reps):
        for family in families:
            for adapter in adapters:
                for resolution in resolutions:
                    for variant in variants:
                        result = run_variant(variant, resolution, adapter=adapter, family=family, **options)
                        results.setdefault((family, adapter, resolution, variant), []).append(result)
                        print(f"# rep {rep + 1} {family} {adapter} {resolution}px {variant}: {result['seconds']:.2f} s/step, "
                              f"peak {result['peak'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return results


def medians(runs: list[dict], batch: int) -> dict:
    """s/step, samples/s and peak memory of one variant: medians over its rounds."""
    seconds = statistics.median(r["seconds"] for r in runs)
    return {"s_per_step": seconds, "samples_per_s": batch / seconds, "peak_bytes": statistics.median(r["peak"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", default=["sd15"], choices=[*FAMILIES, *DIT_FAMILIES],
                        help="base models to measure (default: sd15; flux and sd35: bench/dit_training_step.py)")
    parser.add_argument("--adapter", nargs="+", default=list(ADAPTERS), choices=ADAPTERS, help="adapters to measure (default: both)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds of all variants (one process each)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per process, after one warm-up step")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process before the timed ones")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--unet-width", type=int, help="channels of the UNet's first block (default: the family's, 320: full size)")
    parser.add_argument("--small", action="store_true", help="scaled-down models, to try the script")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if any(family in DIT_FAMILIES for family in args.family):
        if not all(family in DIT_FAMILIES for family in args.family):
            raise SystemExit(f"--family {' '.join(args.family)}: expected UNet families or DiT families, not both")
        import dit_training_step

        return dit_training_step.run(args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        result = worker(args.worker, args.resolution, args.batch, args.steps, args.small, args.warmup, args.adapter[0],
                        args.family[0], args.unet_width)
        print("RESULT " + json.dumps(result), flush=True)
        return

    started = time.time()
    adapters, families = list(dict.fromkeys(args.adapter)), list(dict.fromkeys(args.family))
    try:
        results = compare(args.variants, args.resolutions, args.reps, adapters=adapters, families=families, batch=args.batch,
                          steps=args.steps, warmup=args.warmup, threads=args.threads, small=args.small, unet_width=args.unet_width)
    except RuntimeError as error:
        raise SystemExit(str(error))
    first = next(iter(results.values()))[0]
    print(f"machine: {first['device_name']}, device {first['device']}, {torch.get_num_threads()} torch threads; torch {torch.__version__}")
    print(f"{'scaled-down' if args.small else 'full-size'} {' and '.join(families)} + ViT-H/14 (random weights), "
          f"{f'UNet narrowed to {args.unet_width} channels (encoders and VAE full size), ' if args.unet_width else ''}batch {args.batch}, {args.reps} interleaved rounds x {args.steps} "
          f"timed step(s) after {args.warmup} warm-up, medians; {time.time() - started:.0f} s in all")
    baseline = "reference" if "reference" in args.variants else args.variants[0]
    print(f"| family | UNet (width, parameters) | adapter | trainable | resolution | variant | s/step | samples/s | peak memory (GiB) | "
          f"samples/s vs {baseline} | peak vs {baseline} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for family in families:
        for adapter in adapters:
            for resolution in args.resolutions:
                base = medians(results[(family, adapter, resolution, baseline)], args.batch)
                for variant in args.variants:
                    runs = results[(family, adapter, resolution, variant)]
                    figures, first = medians(runs, args.batch), runs[0]
                    print(f"| {family} | {first['unet_width']}, {first['unet_parameters'] / 1e9:.3f}B | {adapter} | "
                          f"{first['trainable'] / 1e6:.1f}M | {resolution} | {variant} | {figures['s_per_step']:.2f} | "
                          f"{figures['samples_per_s']:.3f} | {figures['peak_bytes'] / 2**30:.2f} | "
                          f"{base['s_per_step'] / figures['s_per_step']:.2f}x | {figures['peak_bytes'] / base['peak_bytes']:.2f}x |")


if __name__ == "__main__":
    main()
