"""Peak resident memory (``VmHWM``) of each training entry point, against the reference recipe's.

Full-size random-weight model files are written once: the SD1.5 single-file checkpoint of the
tests (``devtools.comfyui_harness.sd15_checkpoint_path()``, fp16, cached) and an OpenCLIP ViT-H/14
in the transformers format (fp16, what ComfyUI users have), with a toy dataset of a few images.
Then each entry point runs once in its own process, and reports the process's resident high-water
mark at exit (whole run: loading, the step, saving and export):

- ``online``: ``python -m training.run --cache.use off`` (VAE, ViT-H/14 and text encoder every step);
- ``cache``: ``python -m training.cache`` (the pass that writes the encoders' outputs);
- ``from-cache``: ``python -m training.run --cache.use require`` (the step from the cache);
- ``reference``: the authors' ``tutorial_train.py`` recipe, here: UNet, VAE and text encoder read from
  the same checkpoint (each model's own weights only, as ``from_pretrained`` reads one model's file),
  ``CLIPVisionModelWithProjection.from_pretrained`` for the image encoder, everything fp32, the base
  adapter, one AdamW step on one batch of the toy data with VAE, image and text encoders run on it.

All at ``--resolution`` (256) and batch ``--batch`` (2), one step, fp32 frozen models, no sample grid,
no data workers. The script measures whatever the trainer does today, so it can be re-run after a
change to what an entry point loads. ``--small``: the embedded scaled-down models, no files (a smoke
check in a minute).

    python bench/training_memory.py [--resolution 256] [--batch 2] [--dir DIR (keep and reuse the files)] [--small]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENTRY_POINTS = ("online", "cache", "from-cache", "reference")
# runs a module (``-m``) or a script as ``python`` would, then prints the process's VmHWM, however it ended
WRAPPER = """import runpy, sys
target, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(target, run_name="__main__") if target.endswith(".py") else runpy.run_module(target, run_name="__main__", alter_sys=True)
finally:
    peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(f"VMHWM_KB {peak}", file=sys.stderr, flush=True)
"""
TOY_IMAGES = 4


def write_files(folder: Path, small: bool) -> dict:
    """{"data", "sd15", "image_encoder"} (paths; no model files with ``small``), written once."""
    from training.data import write_toy_dataset

    files = {"data": str(write_toy_dataset(folder / "data", count=TOY_IMAGES))}
    if small:
        return files
    from devtools.comfyui_harness import sd15_checkpoint_path

    files["sd15"] = str(sd15_checkpoint_path())
    vit = folder / "vit_h" / "model.safetensors"
    if not vit.is_file():  # as tests/conftest.py's vit_h_file: transformers format, fp16
        import torch

        from devtools.clip_vision import transformers_model

        model = transformers_model(width=1280, layers=32, heads=16, patch=14, image=224, embed_dim=1024, scale=0.02)
        model.to(torch.float16).save_pretrained(vit.parent)
    files["image_encoder"] = str(vit)
    return files


def reference(files: dict, resolution: int, batch: int, small: bool) -> None:
    """One step of the authors' tutorial_train.py, models loaded as it loads them, fp32."""
    import torch
    import torch.nn.functional as F

    from training.adapter import IPAdapterModel
    from training.data import image_tensors, open_image, read_folder
    from training.weight_files import text_state
    from ipadapter.registry.families import SD15
    from training.base_models import config_dir
    from training.models import PromptTokenizer, build_embedded_models, family_scheduler
    from training.variants import adapter_spec

    torch.manual_seed(0)
    if small:
        models = build_embedded_models(SD15, seed=0)
        unet, vae, image_encoder = models.unet, models.vae, models.image_encoder
        text_encoder = models.text_encoders["text_encoder"]
        encode, embed_dim = (lambda clip: image_encoder.encode(clip).image_embeds), image_encoder.embed_dim
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from safetensors import safe_open
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionModelWithProjection

        def weights(prefix: str) -> dict:  # one model's tensors of the single file
            with safe_open(files["sd15"], "pt") as file:
                return {key: file.get_tensor(key) for key in file.keys() if key.startswith(prefix)}

        config = dict(config=str(config_dir(SD15)), local_files_only=True)
        unet = UNet2DConditionModel.from_single_file(weights("model.diffusion_model."), subfolder="unet", **config).float()
        vae = AutoencoderKL.from_single_file(weights("first_stage_model."), subfolder="vae", **config).float()
        text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(config_dir(SD15) / "text_encoder" / "config.json")))
        prefix = "cond_stage_model.transformer."
        text_encoder.load_state_dict(text_state({k[len(prefix):]: v for k, v in weights(prefix).items()}, text_encoder),
                                     strict=False)
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(str(Path(files["image_encoder"]).parent)).float()
        encode, embed_dim = (lambda clip: image_encoder(clip).image_embeds), image_encoder.config.projection_dim
    for model in (unet, vae, text_encoder, image_encoder):
        model.requires_grad_(False)
    scheduler, tokenizer = family_scheduler(SD15), PromptTokenizer()
    ip_adapter = IPAdapterModel(unet, spec=adapter_spec("base", None, embed_dim, 0, unet))
    optimizer = torch.optim.AdamW(ip_adapter.trainable_parameters(), lr=1e-4, weight_decay=1e-2)

    pairs = read_folder(Path(files["data"]))[0][:batch]  # MyDataset + collate_fn: one batch
    samples = [image_tensors(open_image(pair.image), resolution) for pair in pairs]
    images, clip_images = (torch.stack([s[name] for s in samples]) for name in ("pixels", "clip_pixels"))
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(pairs),)).long()
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        image_embeds = encode(clip_images)
        encoder_hidden_states = text_encoder(tokenizer([pair.caption for pair in pairs]))[0]
    noise_pred = ip_adapter(noisy_latents, timesteps, encoder_hidden_states, image_embeds)
    loss = F.mse_loss(noise_pred.float(), noise.float(), reduction="mean")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"reference step: loss {loss.item():.4f}", flush=True)


def command(entry: str, files: dict, work: Path, resolution: int, batch: int, small: bool) -> list[str]:
    """The entry point's command line (after ``python``)."""
    if entry == "reference":
        return [__file__, "--reference", "--files", *(f"{k}={v}" for k, v in files.items()),
                "--resolution", str(resolution), "--batch", str(batch)] + (["--small"] if small else [])
    flags = ["--data.path", files["data"], "--data.resolution", str(resolution), "--train.batch_size", str(batch),
             "--train.max_steps", "1", "--sample.every", "0", "--data.num_workers", "0", "--train.progress", "false",
             "--model.frozen_dtype", "fp32", "--cache.dir", str(work / "cache"), "--train.output_dir", str(work / entry)]
    if not small:
        flags += ["--model.sd15", files["sd15"], "--model.image_encoder", files["image_encoder"]]
    use = {"online": ["--cache.use", "off"], "cache": [], "from-cache": ["--cache.use", "require"]}[entry]
    return ["training.cache" if entry == "cache" else "training.run", *flags, *use]


def available_gib() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("MemAvailable:"))) / 2**20


def measure(entry: str, arguments: list[str], min_available: float) -> dict:
    """Run one entry point in a fresh process: {"peak_bytes", "seconds"}."""
    while available_gib() < min_available:  # a shared machine: wait for room rather than disturb others
        print(f"# {entry}: {available_gib():.1f} GiB available, waiting for {min_available}", file=sys.stderr, flush=True)
        time.sleep(30)
    started = time.perf_counter()
    output = subprocess.run([sys.executable, "-c", WRAPPER, *arguments], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    peak = next((int(line.split()[1]) * 1024 for line in output.stderr.splitlines() if line.startswith("VMHWM_KB ")), None)
    if output.returncode or peak is None:
        raise SystemExit(f"{entry} failed (exit {output.returncode}):\n{output.stdout[-1500:]}\n{output.stderr[-3000:]}")
    print(f"# {entry}: peak {peak / 2**30:.2f} GiB, {seconds:.0f} s", file=sys.stderr, flush=True)
    return {"peak_bytes": peak, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, help="default 256 (64 with --small)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--entry-points", nargs="+", default=list(ENTRY_POINTS), choices=ENTRY_POINTS)
    parser.add_argument("--dir", help="keep the model files and toy data here and reuse them (default: a temporary folder)")
    parser.add_argument("--min-available", type=float, help="GiB of MemAvailable to wait for before each run (default 12, 0 with --small)")
    parser.add_argument("--small", action="store_true", help="the embedded scaled-down models, no model files")
    parser.add_argument("--write-files", help=argparse.SUPPRESS)
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    resolution = args.resolution or (64 if args.small else 256)
    if args.write_files:
        print("FILES " + " ".join(f"{k}={v}" for k, v in write_files(Path(args.write_files), args.small).items()), flush=True)
        return
    if args.reference:
        reference(dict(item.split("=", 1) for item in args.files), resolution, args.batch, args.small)
        return

    started = time.time()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="training-memory-"))
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="runs-", dir=folder))  # fresh cache and outputs every time
    try:
        # the files are written by a child process, so that this one stays small while the entry points run
        written = subprocess.run([sys.executable, __file__, "--write-files", str(folder)] + (["--small"] if args.small else []),
                                 capture_output=True, text=True, cwd=REPO)
        line = next((l for l in written.stdout.splitlines() if l.startswith("FILES ")), None)
        if line is None:
            raise SystemExit(f"writing the model files failed:\n{written.stderr[-3000:]}")
        files = dict(item.split("=", 1) for item in line.split()[1:])
        min_available = args.min_available if args.min_available is not None else (0 if args.small else 12)
        results = {entry: measure(entry, command(entry, files, work, resolution, args.batch, args.small), min_available)
                   for entry in args.entry_points}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)

    import platform

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB; "
          f"{'scaled-down (embedded)' if args.small else 'full-size SD1.5 + ViT-H/14'} random weights, {resolution} px, "
          f"batch {args.batch}, 1 step, fp32; {time.time() - started:.0f} s in all")
    base = results.get("reference")
    print("| entry point | command | peak RSS (GiB) | vs reference | wall (s) |")
    print("|---|---|---|---|---|")
    for entry, figures in results.items():
        ratio = f"{figures['peak_bytes'] / base['peak_bytes']:.2f}x" if base else "–"
        shown = {"online": "training.run --cache.use off", "cache": "training.cache",
                 "from-cache": "training.run --cache.use require", "reference": "tutorial_train.py recipe"}[entry]
        print(f"| {entry} | {shown} | {figures['peak_bytes'] / 2**30:.2f} | {ratio} | {figures['seconds']:.0f} |")


if __name__ == "__main__":
    main()
