"""DiT training step (Flux.1 XLabs v2, SD3.5 Large InstantX): our step from the encoder cache against a reference
step that runs the encoders every step; seconds per step and peak memory, each variant in its own process.

Both variants run the trainer's own step (``training.dit.flow_loss`` through ``DiTAdapterModel``, AdamW) on the
same random-weight models, everything frozen in bf16:

- ``reference``: the text encoders (Flux.1: CLIP-L and T5-XXL at 512 tokens; SD3.5: CLIP-L, CLIP-bigG and T5-XXL at
  256), the VAE and the image encoder (CLIP ViT-L/14; SigLIP so400m) encode the batch on every step, as a training
  script without a cache does;
- ``ours``: the step from what ``training.cache`` stores (text outputs, image features, VAE moments); the encoders
  are not even built.

Sizes: by default every encoder at its released size and the transformer at its released width with reduced depth
(Flux.1: 1 double + 1 single block; SD3.5: 2 joint blocks): the released depths (57 / 38 blocks) do not fit this
host, and at full depth the transformer's share of a step grows, so the cache's speed-up shrinks (its memory saving,
the encoders' weights, does not). ``--small``: tiny models, to try the script. Peak memory: ``VmHWM`` on the CPU
(reset after the models are built, so it covers the steps with the weights they keep), the CUDA allocator's peak
on a GPU.

    python bench/training_step.py --family flux sd35 [--resolutions 256] [--batch 1] [--reps 2] [--small]
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dit_memory import CLIP_G_TEXT, CLIP_L_TEXT, CLIP_L_VISION, REDUCED_DEPTH, SIGLIP_VISION, T5_XXL, VAE  # noqa: E402
from proc_memory import peak_bytes, reset_peak  # noqa: E402
from timing import device_name  # noqa: E402

VARIANTS = ("reference", "ours")
ADAPTER = {"flux": ("xlabs", 16), "sd35": ("instantx", 64)}  # the variant each family is measured with, its tokens


class RandomIds:
    """A tokenizer stand-in (no vocabulary files here): random ids of the length the pipeline pads to."""

    def __init__(self, vocabulary: int):
        self.vocabulary = vocabulary

    def __call__(self, captions, max_length: int, **_):
        import torch

        return SimpleNamespace(input_ids=torch.randint(1, self.vocabulary, (len(captions), max_length)))


def text_encoders(family, small: bool, transformer_config) -> tuple[dict, dict]:
    """The family's text encoders (random weights, released configs: CLIP-L, then bigG; T5-XXL) and id makers;
    ``small``: tiny ones of the widths the tiny transformer reads."""
    import transformers

    clips, t5 = [CLIP_L_TEXT, CLIP_G_TEXT], T5_XXL
    if small:
        share = transformer_config.pooled_projection_dim // sum(e.layout == "clip" for e in family.training.text_encoders)
        clips = [dict(hidden_size=share, intermediate_size=2 * share, num_hidden_layers=2, num_attention_heads=2,
                      projection_dim=share)] * 2
        t5 = dict(vocab_size=32128, d_model=transformer_config.joint_attention_dim, d_kv=8, d_ff=64, num_layers=2,
                  num_heads=2)
    models, ids = {}, {}
    for encoder in family.training.text_encoders:
        if encoder.layout == "t5":
            models[encoder.folder], ids[encoder.folder] = transformers.T5EncoderModel(transformers.T5Config(**t5)), RandomIds(32128)
        else:
            config = transformers.CLIPTextConfig(**clips.pop(0))
            models[encoder.folder], ids[encoder.folder] = transformers.CLIPTextModelWithProjection(config), RandomIds(49408)
    return models, ids


def vision_config(layout: str, small: bool) -> dict:
    if layout == "xlabs":  # CLIP ViT-L/14, its projected embedding
        return {**CLIP_L_VISION, **(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, projection_dim=32) if small else {})}
    return {**SIGLIP_VISION, **(dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=3) if small else {})}  # SigLIP so400m, hidden states


def image_encoder(layout: str, config: dict):
    """(model, what the adapter reads of it) for CLIP ViT-L/14 (XLabs) or SigLIP so400m (InstantX on SD3.5)."""
    import transformers

    if layout == "xlabs":
        model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**config))
        return model, lambda pixels: model(pixel_values=pixels).image_embeds
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**config))
    return model, lambda pixels: model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


@contextlib.contextmanager
def built_in(dtype, device):
    """Models made inside are made in ``dtype`` on ``device``: T5-XXL in fp32 is 19 GB, FLUX.1-dev 48 GB."""
    import torch

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


def worker(family_id: str, variant: str, resolution: int, batch: int, steps: int, warmup: int, small: bool,
           full_depth: bool = False) -> dict:
    import diffusers
    import torch

    from devtools.dit_models import RELEASED_TRANSFORMERS, TINY_FLUX, TINY_SD3
    from ipadapter.registry import family_by_id
    from training.dit import Conditions, draws, flow_loss
    from training.dit_adapter import DiTAdapterModel
    from training.dit_models import DiTParts

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, family = torch.bfloat16, family_by_id(family_id)
    layout, tokens = ADAPTER[family_id]
    torch.manual_seed(0)
    shape = ({"flux": TINY_FLUX, "sd35": TINY_SD3}[family_id] if small else
             {**RELEASED_TRANSFORMERS[family_id], **({} if full_depth else REDUCED_DEPTH[family_id])})
    with built_in(dtype, device):
        transformer = getattr(diffusers, family.training.denoiser_class)(**shape)
    if full_depth:  # as the memory plan trains it (BENCHMARKS.md, DiT training memory)
        transformer.enable_gradient_checkpointing()
    vision = vision_config(layout, small)
    width = vision["projection_dim"] if layout == "xlabs" else vision["hidden_size"]
    features = (width,) if layout == "xlabs" else ((vision["image_size"] // vision["patch_size"]) ** 2, width)
    model = DiTAdapterModel(transformer, family, layout, tokens, width, reduced_depth=True).to(device)
    key = model.row.encoder_input
    vae = {**VAE, **(dict(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8) if small else {})}
    vae_config = {**vae, "scaling_factor": family.training.vae_scaling_factor, "shift_factor": 0.0}
    parts = DiTParts(transformer, None, vae_config, {}, {}, dict(family.training.noise_schedule), family, dtype, device)
    latent = resolution // parts.vae_scale_factor
    config = SimpleNamespace(data=SimpleNamespace(drop_image=0.05, drop_text=0.05, drop_both=0.05))
    drawn = draws(0, list(range(batch)), (parts.latent_channels, latent, latent), config)
    generator = torch.Generator().manual_seed(1)
    if variant == "reference":  # the encoders, in bf16 on the device, run on every step
        with built_in(dtype, device):
            parts.text_encoders, parts.tokenizers = text_encoders(family, small, transformer.config)
            parts.vae = diffusers.AutoencoderKL(**vae)
            vision_model, read_vision = image_encoder(layout, vision)
        for module in (*parts.text_encoders.values(), parts.vae, vision_model):
            module.to(device, dtype).eval().requires_grad_(False)
        pixels = (torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1).to(device)
        vision_pixels = torch.randn(batch, 3, vision["image_size"], vision["image_size"], generator=generator).to(device, dtype)
        captions = ["a photo of a cat sitting on a red sofa, best quality"] * batch

        @torch.no_grad()
        def batch_data() -> dict:
            context, pooled = parts.encode_text(captions)
            return {"text_embeds": context, "pooled_text": pooled, "moments": parts.encode_moments(pixels),
                    key: read_vision(vision_pixels)}

        with torch.no_grad():  # once, as the trainer does: the empty prompt
            empty_text, empty_pooled = parts.encode_text([""])
        encoder_parameters = sum(p.numel() for m in (*parts.text_encoders.values(), parts.vae, vision_model)
                                 for p in m.parameters())
    else:  # what the cache holds; no encoder is built in this process
        text_tokens = sum(e.max_length for e in family.training.text_encoders if e.in_context and e.layout == "t5") + \
            (77 if any(e.in_context and e.layout == "clip" for e in family.training.text_encoders) else 0)
        cached = {"text_embeds": torch.randn(batch, text_tokens, transformer.config.joint_attention_dim, generator=generator),
                  "pooled_text": torch.randn(batch, transformer.config.pooled_projection_dim, generator=generator),
                  "moments": torch.randn(batch, 2 * parts.latent_channels, latent, latent, generator=generator),
                  key: torch.randn(batch, *features, generator=generator)}
        cached = {name: tensor.to(device, dtype) for name, tensor in cached.items()}

        def batch_data() -> dict:
            return cached

        empty_text, empty_pooled, encoder_parameters = cached["text_embeds"][:1], cached["pooled_text"][:1], 0
    stored = SimpleNamespace(empty_text=empty_text, empty_pooled=empty_pooled,
                             dropped_image=torch.zeros(1, *features, device=device, dtype=dtype))
    conditions = Conditions(parts, key, None, stored)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, weight_decay=0.01)

    def step() -> float:
        started = time.perf_counter()
        loss = flow_loss(model, parts, conditions, batch_data(), drawn)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for _ in range(warmup):
        step()
    reset_peak(device)
    times = [step() for _ in range(steps)]
    return {"seconds": statistics.median(times), "peak": peak_bytes(device), "device": str(device),
            "device_name": device_name(device), "trainable": model.num_trainable(), "encoder_parameters": encoder_parameters,
            "transformer_parameters": sum(p.numel() for p in transformer.parameters() if not p.requires_grad)}


def run_variant(family: str, variant: str, resolution: int, batch: int, steps: int, warmup: int, threads: int,
                small: bool, full_depth: bool = False, cpu: bool = False) -> dict:
    """One variant's steps in a fresh process, so that its peak memory is its own; ``cpu``: hide any GPU from it."""
    command = [sys.executable, __file__, "--worker", variant, "--family", family, "--resolution", str(resolution),
               "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)]
    command += (["--small"] if small else []) + (["--full-depth"] if full_depth else [])
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if cpu else None
    output = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    line = next((l for l in output.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{family} {variant} at {resolution} failed:\n{output.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def measure(family: str, resolution: int, reps: int, steps: int, warmup: int, threads: int = 0, small: bool = False,
            full_depth: bool = False, cpu: bool = False) -> dict:
    """{variant: {s_per_step, samples_per_s, peak_bytes}} (batch 1, medians over ``reps`` interleaved rounds), for
    bench/gpu.py."""
    runs: dict = {}
    for _ in range(reps):
        for variant in VARIANTS:
            runs.setdefault(variant, []).append(run_variant(family, variant, resolution, 1, steps, warmup, threads, small,
                                                            full_depth, cpu))
    return {variant: {"s_per_step": statistics.median(r["seconds"] for r in results),
                      "samples_per_s": 1 / statistics.median(r["seconds"] for r in results),
                      "peak_bytes": statistics.median(r["peak"] for r in results)} for variant, results in runs.items()}


def run(args) -> None:
    """``bench/training_step.py --family flux sd35 ...``: interleaved rounds of both variants, medians, a table."""
    import torch

    started, results = time.time(), {}
    for rep in range(args.reps):
        for family in args.family:
            for resolution in args.resolutions:
                for variant in VARIANTS:
                    result = run_variant(family, variant, resolution, args.batch, args.steps, args.warmup, args.threads,
                                         args.small)
                    results.setdefault((family, resolution, variant), []).append(result)
                    print(f"# rep {rep + 1} {family} {resolution}px {variant}: {result['seconds']:.2f} s/step, "
                          f"peak {result['peak'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    first = next(iter(results.values()))[0]
    print(f"machine: {first['device_name']}, device {first['device']}, {torch.get_num_threads()} torch threads; "
          f"torch {torch.__version__}; {'tiny' if args.small else 'released-width'} models in bf16 (random weights), "
          f"batch {args.batch}, {args.reps} interleaved rounds x {args.steps} timed step(s) after {args.warmup} warm-up, "
          f"medians; {time.time() - started:.0f} s in all")
    print("| family | adapter (trainable) | transformer (frozen) | resolution | variant | encoders | s/step | "
          "peak memory (GiB) | s/step vs reference | peak vs reference |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family in args.family:
        for resolution in args.resolutions:
            base = results[(family, resolution, "reference")]
            base_seconds, base_peak = (statistics.median(r[k] for r in base) for k in ("seconds", "peak"))
            for variant in VARIANTS:
                runs = results[(family, resolution, variant)]
                seconds, peak = (statistics.median(r[k] for r in runs) for k in ("seconds", "peak"))
                first = runs[0]
                print(f"| {family} | {ADAPTER[family][0]} ({first['trainable'] / 1e6:.1f}M) | "
                      f"{first['transformer_parameters'] / 1e9:.2f}B | {resolution} | {variant} | "
                      f"{first['encoder_parameters'] / 1e9:.2f}B | {seconds:.2f} | {peak / 2**30:.2f} | "
                      f"{seconds / base_seconds:.2f}x | {peak / base_peak:.2f}x |")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", default=["flux", "sd35"], choices=list(ADAPTER))
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--full-depth", action="store_true", help="the released depth, blocks recomputed (a GPU's size)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        result = worker(args.family[0], args.worker, args.resolution, args.batch, args.steps, args.warmup, args.small,
                        args.full_depth)
        print("RESULT " + json.dumps(result), flush=True)
        return
    run(args)


if __name__ == "__main__":
    main()
