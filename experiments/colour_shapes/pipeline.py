"""The whole experiment: data -> base model -> adapter (our trainer) -> samples (ComfyUI + our nodes) -> measurements."""
from __future__ import annotations

import json
import logging
import platform
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from training.models import PromptTokenizer

from . import base, data, diagnose, measure

log = logging.getLogger("colour_shapes")
WEIGHTS = (0.0, 0.5, 1.0)


@dataclass
class Settings:
    output_dir: str = "runs/colour_shapes"
    seed: int = 0
    dataset_size: int = 2000
    vae_steps: int = 600
    vae_batch: int = 16
    vae_colour_weight: float = 1.0  # pull latent channels 0-2 towards the 8x8 mean colour (see base.train_vae)
    encoder_steps: int = 300  # CLIP-style pretraining of the image encoder on full captions; 0: random, frozen
    encoder_batch: int = 64
    unet_width: int = 64  # ComfyUI fixes 32 norm groups: at 32 channels each group is one channel and the last norm erases every channel's mean
    base_steps: int = 900
    base_batch: int = 32  # per sample about 1.5x cheaper than 16 on 2 cores
    base_lr: float = 5e-4  # 1e-3 diverges at width 64
    adapter_steps: int = 1500
    adapter_batch: int = 8  # the paper's batch per device
    adapter_lr: float = 1e-3  # the paper: 1e-4 (too slow to show anything in CPU minutes: see README)
    samples_per_case: int = 4  # samples per (reference, caption, λ), one KSampler batch
    references_per_colour: int = 1  # shapes rotate over the colours
    sampling_steps: int = 15
    guidance: float = 5.0
    weights: tuple = WEIGHTS
    threads: int = 0  # 0: leave torch's default
    reuse_base: bool = False  # reuse <output_dir>/base_model when it was trained with the same settings


BASE_SETTINGS = ("seed", "dataset_size", "vae_steps", "vae_batch", "vae_colour_weight", "encoder_steps", "encoder_batch", "unet_width", "base_steps", "base_batch", "base_lr")


def run(settings: Settings) -> dict:
    started = time.perf_counter()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    # 1. the data
    t = time.perf_counter()
    folder = data.write_dataset(out / "data", settings.dataset_size, seed=settings.seed)
    images, captions = data.read_dataset(folder)
    timings["data"] = time.perf_counter() - t

    # 2. the base model, trained with text conditioning only, then frozen
    base_settings = {k: v for k, v in asdict(settings).items() if k in BASE_SETTINGS}
    done = out / "base_model" / "done.json"
    if settings.reuse_base and done.is_file() and json.loads(done.read_text())["settings"] == base_settings:
        log.info("base model: reusing %s (same settings)", done.parent)
        unet, vae, text_encoder, image_encoder, reports = base.load_models(done.parent)
        vae_report, encoder_report, base_report, probe = reports["vae"], reports["encoder"], reports["base"], reports["probe"]
    else:
        vae = base.build_vae(settings.seed + 1)
        vae_report = base.train_vae(vae, settings.vae_steps, settings.vae_batch, settings.seed + 1,
                                    colour_weight=settings.vae_colour_weight)
        text_encoder = base.build_text_encoder(settings.seed + 2)
        image_encoder = base.build_image_encoder(settings.seed + 3)
        encoder_report = base.pretrain_image_encoder(image_encoder, settings.encoder_steps, settings.encoder_batch, settings.seed + 9)
        probe = base.colour_probe(image_encoder, settings.seed + 4)
        unet = base.build_unet(settings.unet_width, settings.seed + 5)
        base_report = base.train_base(unet, vae, text_encoder, images, captions, settings.base_steps, settings.base_batch,
                                      settings.seed + 6, lr=settings.base_lr)
        base.save_models(out / "base_model", unet, vae, text_encoder, image_encoder)
        done.write_text(json.dumps({"settings": base_settings, "vae": vae_report, "encoder": encoder_report, "base": base_report, "probe": probe}, indent=2))
    timings["vae"], timings["encoder"], timings["base"] = vae_report["seconds"], encoder_report["seconds"], base_report["seconds"]
    log.info("image encoder: nearest-centroid colour accuracy %.3f (chance %.3f)", probe, measure.CHANCE_COLOUR)
    sd_folder, encoder_file = out / "base_model", out / "base_model" / "image_encoder.safetensors"

    # 3. the adapter, with our trainer, from the saved files
    t = time.perf_counter()
    adapter_file = train_adapter(settings, sd_folder, encoder_file, folder, out / "adapter")
    timings["adapter"] = time.perf_counter() - t
    diagnosis = diagnose.loss_by_timestep(sd_folder, encoder_file, adapter_file, settings.seed + 10)

    # 4. sampling through ComfyUI and our nodes, from the exported file
    t = time.perf_counter()
    references = reference_images(settings)
    rows = sample_grid(settings, references, unet, vae, text_encoder, adapter_file, encoder_file)
    timings["sampling"] = time.perf_counter() - t

    # 5. measurements
    checks = classifier_checks(vae, settings.seed + 7)
    table = summarise(rows, settings.weights)
    grid_path = write_grid(rows, references, settings, out / "grid.png")
    timings["total"] = time.perf_counter() - started
    result = {
        "settings": asdict(settings),
        "chance": {"colour": measure.CHANCE_COLOUR, "shape": measure.CHANCE_SHAPE},
        "table": table,
        "classifier_checks": checks,
        "image_encoder_colour_probe": probe,
        "loss_by_timestep": diagnosis,
        "vae": vae_report, "image_encoder": encoder_report, "base": base_report,
        "adapter_file": str(adapter_file),
        "samples": len(rows),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "grid": str(grid_path),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    log.info("results: %s", out / "results.json")
    return result


def train_adapter(settings: Settings, sd_folder: Path, encoder_file: Path, data_folder: Path, output_dir: Path) -> Path:
    """``python -m training.cache``, then ``python -m training.run`` on the saved base model: the paper's drops,
    zero embedding, everything else frozen; the frozen encoders run once per image, in the cache pass."""
    from training.cache import main as cache_main
    from training.run import main as train_main

    files = [
        "--model.base", str(sd_folder), "--model.image_encoder", str(encoder_file),
        "--data.path", str(data_folder), "--data.resolution", str(data.SIZE), "--data.num_workers", "0",
        "--cache.dir", str(output_dir / "cache"), "--train.progress", "false",
    ]
    cache_main(files)
    # a rerun in the same folder trains from step 0 again; the last run's state is not resumed
    shutil.rmtree(output_dir / "state", ignore_errors=True)
    argv = files + [
        "--cache.use", "require",
        "--train.batch_size", str(settings.adapter_batch), "--train.max_steps", str(settings.adapter_steps),
        "--optim.lr", str(settings.adapter_lr), "--train.seed", str(settings.seed + 8),
        "--train.output_dir", str(output_dir), "--train.save_every", "0", "--train.export_every", "0",
        "--train.export_formats", "safetensors", "--train.log_every", "50",
        "--sample.every", "0",
    ]
    result = train_main(argv)
    (adapter_file,) = [p for p in result["export"] if str(p).endswith(".safetensors")]
    history = result["history"]
    log.info("adapter: %d steps, loss %.4f -> %.4f, exported %s", result["step"], history[0], history[-1], adapter_file)
    return Path(adapter_file)


def sample_grid(settings: Settings, references, unet, vae, text_encoder, adapter_file: Path, encoder_file: Path) -> list[dict]:
    """Every reference with every caption at every λ through ComfyUI and our nodes, classified."""
    from .comfy_sampling import ComfySampler

    sampler = ComfySampler(unet, vae, adapter_file, encoder_file)
    prompts = [data.caption(s) for s in data.SHAPES]
    contexts = base.text_embeddings(text_encoder, PromptTokenizer(), prompts + [""])
    negative = contexts[-1:]
    rows = []
    for ref_index, (ref_image, ref_shape, ref_colour) in enumerate(references):
        for cap_index, cap_shape in enumerate(data.SHAPES):
            seed = settings.seed * 100_000 + ref_index * 10 + cap_index  # the same noise at every λ
            for weight in settings.weights:
                samples = sampler.sample(ref_image, contexts[cap_index:cap_index + 1], negative, weight,
                                         settings.samples_per_case, seed, settings.sampling_steps, settings.guidance)
                for k, sample in enumerate(samples):
                    rows.append({"reference": ref_index, "ref_shape": ref_shape, "ref_colour": ref_colour,
                                 "caption_shape": cap_shape, "weight": weight, "sample": k,
                                 "colour": measure.classify_colour(sample), "shape": measure.classify_shape(sample),
                                 "image": sample})
    return rows


def reference_images(settings: Settings) -> list[tuple[np.ndarray, str, str]]:
    """Held-out references (their own seed): every colour with ``references_per_colour`` shapes."""
    rng = random.Random(settings.seed + 1_000_003)
    references = []
    for colour in data.COLOUR_NAMES:
        for k in range(settings.references_per_colour):
            shape = data.SHAPES[(len(references) + k) % len(data.SHAPES)] if settings.references_per_colour == 1 else data.SHAPES[k % len(data.SHAPES)]
            references.append((np.asarray(data.render(shape, colour, rng)), shape, colour))
    return references


def summarise(rows: list[dict], weights) -> list[dict]:
    table = []
    plain = {(r["reference"], r["caption_shape"], r["sample"]): r["image"] for r in rows if r["weight"] == 0.0}
    for weight in weights:
        at = [r for r in rows if r["weight"] == weight]
        changed = [np.abs(r["image"].astype(np.float64) - plain[(r["reference"], r["caption_shape"], r["sample"])]).mean() / 255
                   for r in at if plain]
        other = [r for r in at if r["caption_shape"] != r["ref_shape"]]
        table.append({
            "weight": weight,
            "samples": len(at),
            "colour_of_reference": measure.accuracy([r["colour"] for r in at], [r["ref_colour"] for r in at]),
            "shape_of_caption": measure.accuracy([r["shape"] for r in at], [r["caption_shape"] for r in at]),
            "shape_of_caption_when_reference_differs": measure.accuracy([r["shape"] for r in other], [r["caption_shape"] for r in other]),
            "shape_of_reference_when_caption_differs": measure.accuracy([r["shape"] for r in other], [r["ref_shape"] for r in other]),
            "nothing_drawn": float(np.mean([r["shape"] is None for r in at])),
            "pixel_change_from_weight_0": float(np.mean(changed)) if changed else float("nan"),  # same noise, |Δ| / 255
        })
    return table


@torch.no_grad()
def classifier_checks(vae, seed: int, count: int = 300) -> dict:
    """The classifiers on held-out dataset images, as drawn and after a VAE round trip (the best a sample can look)."""
    images, _, shapes, colours = data.batch(random.Random(seed), count)
    decoded = vae.decode(vae.encode(base.pixels(images)).latent_dist.mean).sample
    decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    result = {}
    for name, batch in (("drawn", images), ("vae_round_trip", decoded)):
        result[name] = {
            "colour": measure.accuracy([measure.classify_colour(i) for i in batch], colours),
            "shape": measure.accuracy([measure.classify_shape(i) for i in batch], shapes),
        }
    return result


def write_grid(rows: list[dict], references, settings: Settings, path: Path, per_colour: int = 1) -> Path:
    """One row per shown reference: the reference, then for each caption the first sample at each λ."""
    cell, gap = data.SIZE, 4
    shown = [i for i in range(len(references)) if i % settings.references_per_colour < per_colour]
    columns = 1 + len(data.SHAPES) * len(settings.weights)
    header = 28
    width = columns * cell + (columns - 1) * gap + len(data.SHAPES) * gap
    grid = Image.new("RGB", (width, header + len(shown) * (cell + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    lookup = {(r["reference"], r["caption_shape"], r["weight"]): r["image"] for r in rows if r["sample"] == 0}
    x_positions = [0]
    for c, shape in enumerate(data.SHAPES):
        for w, weight in enumerate(settings.weights):
            x_positions.append(x_positions[-1] + cell + gap + (gap if w == 0 else 0))
    draw.text((2, 2), "reference", fill=(0, 0, 0))
    for c, shape in enumerate(data.SHAPES):
        for w, weight in enumerate(settings.weights):
            x = x_positions[1 + c * len(settings.weights) + w]
            if w == 0:
                draw.text((x, 2), f"\"{data.caption(shape)}\"", fill=(0, 0, 0))
            draw.text((x, 15), f"λ={weight:g}".replace("λ", "w"), fill=(0, 0, 0))
    for row, ref_index in enumerate(shown):
        y = header + row * (cell + gap)
        grid.paste(Image.fromarray(references[ref_index][0]), (0, y))
        for c, shape in enumerate(data.SHAPES):
            for w, weight in enumerate(settings.weights):
                grid.paste(Image.fromarray(lookup[(ref_index, shape, weight)]), (x_positions[1 + c * len(settings.weights) + w], y))
    grid.save(path, optimize=True)
    return path
