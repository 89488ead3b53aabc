"""``python -m training.eval``: CLIP-I and CLIP-T of an IP-Adapter, the paper's protocol.

Generates ``--samples-per-image`` images per reference image prompt (DDIM 50 steps, CFG 7.5,
λ = 1, empty text prompt: the paper's image-prompt-only setting) with the user's SD1.5, adapter
and ViT-H/14 encoder, or scores images already generated (``--generated DIR``), with a CLIP
model from a file. Writes ``report.json`` and ``per_image.csv`` and prints the means.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ipadapter.files import write_text_atomic
from ipadapter.registry import VARIANTS

from .cli import run_cli
from .clip_score import CLIPSCORE_WEIGHT, clipscore, load_scoring_clip, score_samples, summarize
from .eval_data import EvalError, Reference, generated_files, load_references

GENERATION_SETTINGS = "generation.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.eval", description="CLIP-I and CLIP-T of an IP-Adapter with the paper's protocol "
                                     "(see the Evaluation section of training/README.md).")
    parser.add_argument("--data", required=True, help="COCO-2017 folder (annotations/ + val2017/), captions_val2017.json, "
                        ".jsonl/.csv manifest, or a folder of images with .txt captions")
    parser.add_argument("--images", help="COCO images folder when it is not val2017/ next to annotations/")
    parser.add_argument("--limit", type=int, default=2000, help="first N references (default 2000, the paper's; 0 = all)")
    parser.add_argument("--samples-per-image", type=int, default=4, help="generated images per reference (paper: 4)")
    parser.add_argument("--clip", required=True, help="scoring CLIP: full OpenCLIP checkpoint or transformers CLIPModel folder")
    parser.add_argument("--clip-model", default="ViT-L-14", help="OpenCLIP architecture of --clip (name or config .json; "
                        "default ViT-L-14, the paper's; ViT-L-14-quickgelu for OpenAI weights)")
    parser.add_argument("--generated", help="score the images in this folder (<reference name>_<k>.png) instead of generating")
    parser.add_argument("--base", help="the base model: diffusers folder or single-file checkpoint (its family is read from it)")
    parser.add_argument("--adapter", help="IP-Adapter checkpoint of that family (.bin or .safetensors, official layout; "
                        f"{', '.join(v.name for v in VARIANTS)})")
    parser.add_argument("--image-encoder", help="the adapter's image encoder (the one it was trained on)")
    parser.add_argument("--scale", type=float, default=1.0, help="λ, the image prompt weight (paper: 1.0)")
    parser.add_argument("--prompt", choices=("empty", "caption"), default="empty",
                        help="text prompt: empty (paper, image prompt only) or the reference's caption")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (paper: 50)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (paper: 7.5)")
    parser.add_argument("--resolution", type=int, help="default: the family's training resolution")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto", help="dtype of the base model and the encoder")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--generation-batch", type=int, default=4,
                        help="references generated together (x samples-per-image x 2 for guidance); images do not depend on it")
    parser.add_argument("--batch-size", type=int, default=32, help="images per CLIP scoring batch")
    parser.add_argument("--output", default="runs/eval", help="folder for report.json, per_image.csv and generated images")
    parser.add_argument("--overwrite", action="store_true", help="regenerate images that the output folder already holds")
    args = parser.parse_args(argv)
    generation = [args.base, args.adapter, args.image_encoder]
    if args.generated and any(generation):
        raise EvalError("--generated scores existing images; leave out --base/--adapter/--image-encoder (or --generated)")
    if not args.generated and not all(generation):
        absent = [f"--{n}" for n, v in zip(("base", "adapter", "image-encoder"), generation) if not v]
        raise EvalError(f"{', '.join(absent)} not given; expected --base, --adapter and --image-encoder to generate, "
                        "or --generated DIR to score existing images")
    args.family = None
    if args.base:
        from .base_models import detect_family
        from .errors import ModelFileError

        try:
            args.family = detect_family(args.base, "--base")
        except ModelFileError as error:
            raise EvalError(str(error)) from None
    if args.resolution is None and args.family is not None:
        args.resolution = args.family.training.resolution
    for name in ("samples_per_image", "steps", "resolution", "batch_size", "generation_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:  # no resolution: scoring existing images
            raise EvalError(f"--{name.replace('_', '-')} = {getattr(args, name)}; expected a positive number")
    if args.limit < 0:
        raise EvalError(f"--limit = {args.limit}; expected 0 (all) or more")
    if args.resolution is not None and args.resolution % 8:
        raise EvalError(f"--resolution = {args.resolution}; expected a multiple of 8")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; returns the report (also written to ``<output>/report.json``). Errors are one line."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    except RuntimeError:
        raise EvalError(f"--device '{args.device}' is not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {args.device}: CUDA is not available here; expected --device cpu or auto")
    references, description = load_references(args.data, args.limit or None, args.images)
    clip = load_scoring_clip(args.clip, args.clip_model)  # before generating: a wrong file fails in seconds
    output = Path(args.output)
    if args.generated:
        files = generated_files(args.generated, references, args.samples_per_image)
    else:
        files = generate_all(args, references, output / "images", device)
    scores = score(clip.to(device), references, files, args.batch_size)
    report = build_report(args, description, clip.name, references, files, scores)
    write_report(report, output)
    print(format_table(report["summary"]), flush=True)
    print(f"report: {(output / 'report.json').resolve()}", flush=True)
    return report


# --- generation ---------------------------------------------------------------------


def generate_all(args: argparse.Namespace, references: list[Reference], folder: Path, device: torch.device) -> list[list[Path]]:
    """``<key>_<k>.png`` for every reference; sets already in ``folder`` with the same settings are kept."""
    from .data import image_tensors, open_image
    from .sampling import generate

    settings = {k: getattr(args, k) for k in ("adapter", "base", "image_encoder", "scale", "prompt", "steps", "guidance",
                                               "resolution", "seed", "dtype")}
    settings_file = folder / GENERATION_SETTINGS
    if settings_file.is_file() and not args.overwrite and json.loads(settings_file.read_text()) != settings:
        raise EvalError(f"'{folder}' holds images generated with other settings ({settings_file.name}); "
                        "use another --output or pass --overwrite")
    files = [[folder / f"{r.key}_{k}.png" for k in range(args.samples_per_image)] for r in references]
    todo = [i for i, row in enumerate(files) if args.overwrite or not all(p.is_file() for p in row)]
    if not todo:
        return files
    model, frozen = load_generator(args, device)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(settings_file, json.dumps(settings, indent=1))
    progress = _progress(len(todo), "generating")
    samples = args.samples_per_image
    for start in range(0, len(todo), args.generation_batch):
        group = todo[start:start + args.generation_batch]
        clip_pixels = torch.stack([image_tensors(open_image(references[i].image), args.resolution)["clip_pixels"]
                                   for i in group]).repeat_interleave(samples, dim=0)
        prompts = [references[i].caption if args.prompt == "caption" else "" for i in group for _ in range(samples)]
        seeds = [sample_seed(args.seed, i, k) for i in group for k in range(samples)]
        images = generate(model, frozen, clip_pixels, prompts, args.scale, args.resolution, args.steps, args.guidance, seeds)
        for image, path in zip(images, [path for i in group for path in files[i]]):
            array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(array).save(path)
        progress.update(len(group))
    progress.close()
    return files


def sample_seed(seed: int, reference: int, sample: int) -> int:
    """The noise seed of one generated image: fixed by (--seed, reference position, k), whatever the batching."""
    return (seed * 1_000_003 + reference) * 1009 + sample


def load_generator(args: argparse.Namespace, device: torch.device):
    """The base model + the adapter (any variant; official layout) + the image encoder, on ``device``."""
    from ipadapter.adapter_file import check_encoder, load_adapter

    from .adapter import IPAdapterModel
    from .models import load_frozen_models, resolve_dtype

    family = args.family
    checkpoint = load_adapter(args.adapter, base_width=None, architecture=family)  # another family's file: refused
    spec = checkpoint.spec
    embeds = spec.encoder_input == "image_embeds"  # hidden states: check_encoder below
    frozen = load_frozen_models(args.base, args.image_encoder, resolve_dtype(args.dtype, device), family, spec.encoder_width,
                                check_embed_dim=embeds)
    check_encoder(spec, frozen.image_encoder.embed_dim, frozen.image_encoder.hidden_width, checkpoint.source, frozen.image_encoder.name)
    unet_width = frozen.unet.config.block_out_channels[0]
    if spec.base_width != unet_width:
        raise EvalError(f"'{checkpoint.source}' was made for a UNet of base width {spec.base_width}; "
                        f"the {family.name} model's is {unet_width}")
    model = IPAdapterModel(frozen.unet, spec=spec)
    model.load_trainable_state_dict({k: v.float() for k, v in checkpoint.flat_state_dict().items()})
    frozen.to(device)
    return model.to(device).eval(), frozen


# --- scoring and the report ---------------------------------------------------------


def score(clip, references: list[Reference], files: list[list[Path]], batch_size: int) -> dict[str, torch.Tensor]:
    from .data import BadSample, open_image

    def images(paths):
        opened = []
        for path in paths:
            try:
                opened.append(open_image(str(path)))
            except BadSample as bad:
                raise EvalError(f"image '{path}' cannot be used ({bad.reason}); expected a readable image file") from None
        return opened

    def embed(items, encode, what):
        progress = _progress(len(items), what)
        chunks = []
        for start in range(0, len(items), batch_size):
            chunks.append(encode(items[start:start + batch_size]))
            progress.update(len(chunks[-1]))
        progress.close()
        return torch.cat(chunks)

    reference_embeds = embed([r.image for r in references], lambda b: clip.encode_images(images(b)), "CLIP: references")
    caption_embeds = embed([r.caption for r in references], clip.encode_texts, "CLIP: captions")
    flat = [path for row in files for path in row]
    generated = embed(flat, lambda b: clip.encode_images(images(b)), "CLIP: generated")
    return score_samples(generated.view(len(references), len(files[0]), -1), reference_embeds, caption_embeds)


def build_report(args, description: str, clip_name: str, references, files, scores) -> dict:
    protocol = {"data": description, "samples_per_image": args.samples_per_image, "scoring_clip": f"{clip_name} from {args.clip}",
                "clipscore": f"{CLIPSCORE_WEIGHT} * max(cosine, 0) per image, then the mean",
                "mode": "scored existing images" if args.generated else "generated"}
    if args.generated:
        protocol["generated"] = str(args.generated)
    else:
        protocol.update({k: getattr(args, k) for k in ("base", "adapter", "image_encoder", "scale", "prompt", "steps",
                                                       "guidance", "resolution", "seed")})
        protocol["family"] = args.family.id
        protocol["sampler"] = "DDIM"
    per_image = []
    for index, reference in enumerate(references):
        row = {"reference": reference.key, "image": reference.image, "caption": reference.caption,
               "generated": [str(p) for p in files[index]]}
        for name in ("clip_i", "clip_t"):
            values = scores[name][index]
            row[name] = float(values.mean())
            row[f"{name}_clipscore"] = float(clipscore(values).mean())
            row[f"{name}_samples"] = [float(v) for v in values]
        per_image.append(row)
    return {"protocol": protocol, "summary": summarize(scores), "per_image": per_image}


def write_report(report: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "report.json", json.dumps(report, indent=1))
    columns = ["reference", "image", "caption", "clip_i", "clip_i_clipscore", "clip_t", "clip_t_clipscore"]
    with (folder / "per_image.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in report["per_image"]:
            writer.writerow([f"{row[c]:.6f}" if isinstance(row[c], float) else row[c] for c in columns])


def format_table(summary: dict) -> str:
    lines = [f"{'':8}{'cosine':>10}{'CLIPScore (2.5*max(cos,0))':>30}"]
    for name, label in (("clip_i", "CLIP-I"), ("clip_t", "CLIP-T")):
        lines.append(f"{label:8}{summary[name]['cosine']:>10.4f}{summary[name]['clipscore']:>30.4f}")
    lines.append(f"n = {summary['n_references']} reference images x "
                 f"{summary['n_samples'] // max(summary['n_references'], 1)} samples = {summary['n_samples']} images")
    return "\n".join(lines)


def _progress(total: int, what: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=what, file=sys.stderr, disable=total < 2 or not sys.stderr.isatty())


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
