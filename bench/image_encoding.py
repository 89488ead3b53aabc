"""Image encoding: ViT-H/14 time per reference image, and no second encoding of an unchanged reference.

Part 1 (in process): the full-size OpenCLIP ViT-H/14 (random weights) through the core's
``encode_images`` (CLIP preprocessing included, what the Encode node runs), for a
batch of 1 and of 4 reference images, interleaved repetitions, medians.

Part 2 (a real ComfyUI server with this pack): the graph LoadImage -> Load IP-Adapter
Image Encoder -> IP-Adapter Encode Image -> Save Embeds is queued again and again,
alternating a re-queue with the same reference image (only the file name prefix of the
save node changes) and a queue with the other reference image. ComfyUI's history says
which nodes ran and which came from its cache; the figure is the median wall time of a
re-queue with an unchanged reference over that of a queue with a changed one. Usage:

    python bench/image_encoding.py [--reps 5] [--threads N] [--small]

The ComfyUI is $COMFYUI_PATH or the pinned copy the tests use (devtools/comfyui_setup.py); the
server runs with OMP_NUM_THREADS = --threads (1 by default).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # ipadapter and devtools

from timing import building_on, free_memory, interleaved, median, pick_device  # noqa: E402

ENCODER_FILE = "vit-h-14-random.safetensors"


SMALL_TOWER = dict(width=128, layers=2, head_width=64)  # a narrow tower; the output widths stay the named one's


def build_tower(name: str, small: bool, device, dtype):
    from ipadapter.encoder import build_vision_tower

    import torch

    torch.manual_seed(0)
    with building_on(device):
        encoder = build_vision_tower(name, **(SMALL_TOWER if small else {}))
    return encoder.eval().to(device, dtype)


def encoding_times(name: str, small: bool, batches: tuple[int, ...], reps: int, device, dtype) -> dict:
    """Median encoding time per image of an OpenCLIP tower (random weights) through ``encode_images``,
    CLIP preprocessing of 512x640 images included, for each batch size; interleaved repetitions."""
    import torch

    encoder = build_tower(name, small, device, dtype)
    generator = torch.Generator().manual_seed(0)
    images = {count: torch.rand(count, 512, 640, 3, generator=generator).to(device) for count in batches}  # ComfyUI IMAGE layout

    def encode(count: int):
        with torch.no_grad():
            encoder.encode_images(images[count], mode="crop")

    times = interleaved({count: (lambda count=count: encode(count)) for count in batches}, reps, device)
    one = median(times[batches[0]]) / batches[0]
    result = {
        "parameters": sum(p.numel() for p in encoder.parameters()), "image_size": encoder.image_size,
        "dtype": str(dtype).replace("torch.", ""), "reps": reps,
        **{f"batch_{count}": {"median_s_per_image": median(values) / count, "ratio_to_batch_1": median(values) / count / one}
           for count, values in times.items()},
    }
    del encoder
    free_memory(device)
    return result


def encoding_table(name: str, small: bool, result: dict, device_type: str) -> list[str]:
    lines = [
        f"{'scaled-down ' if small else ''}OpenCLIP {name} ({result['parameters'] / 1e6:.0f}M parameters, {result['dtype']} on {device_type}), "
        f"512x640 images, center crop to {result['image_size']}, {result['reps']} interleaved reps",
        "",
        "| reference images per call | median time per image (s) | ratio to one per call |",
        "|---|---|---|",
    ]
    for key, figures in result.items():
        if key.startswith("batch_"):
            lines.append(f"| {key[len('batch_'):]} | {figures['median_s_per_image']:.4f} | {figures['ratio_to_batch_1']:.2f}× |")
    return lines


def part_one(args) -> list[str]:
    device, dtype = pick_device()
    result = encoding_times("ViT-H-14", args.small, (1, 4), args.reps, device, dtype)
    return encoding_table("ViT-H-14", args.small, result, device.type)


def write_encoder(folder: Path, small: bool) -> None:
    import torch
    from safetensors.torch import save_file

    from devtools.clip_vision import transformers_model

    shape = dict(width=128, layers=2, heads=2) if small else dict(width=1280, layers=32, heads=16)
    model = transformers_model(**shape, patch=14, image=224, embed_dim=1024, scale=0.02)
    save_file({k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}, str(folder / ENCODER_FILE))


def part_two(args) -> list[str]:
    import numpy as np

    from devtools.comfyui_harness import start_comfyui_server
    from devtools.comfyui_setup import ensure_comfyui

    os.environ["OMP_NUM_THREADS"] = str(args.threads or 1)
    comfyui = Path(os.environ.get("COMFYUI_PATH") or ensure_comfyui())
    with tempfile.TemporaryDirectory() as temporary:
        base = Path(temporary)
        server = start_comfyui_server(base / "comfy", {"ComfyUI-IPAdapter-SD15": REPO}, comfyui)
        try:
            server.models_dir("clip_vision").mkdir(parents=True, exist_ok=True)
            write_encoder(server.models_dir("clip_vision"), args.small)
            rng = np.random.default_rng(0)
            for name, colour in (("a.png", (0.9, 0.1, 0.1)), ("b.png", (0.1, 0.2, 0.9))):
                server.write_input_image(name, np.clip(np.tile(colour, (512, 640, 1)) + rng.normal(0, 0.05, (512, 640, 3)), 0, 1))

            def graph(reference: str, prefix: str) -> dict:
                return {
                    "image": {"class_type": "LoadImage", "inputs": {"image": reference}},
                    "encoder": {"class_type": "IPAdapterKitEncoderLoader", "inputs": {"clip_name": ENCODER_FILE}},
                    "encode": {"class_type": "IPAdapterKitEncode", "inputs": {"image_encoder": ["encoder", 0], "image": ["image", 0], "crop": "crop"}},
                    "save": {"class_type": "IPAdapterKitSaveEmbeds", "inputs": {"embeds": ["encode", 0], "filename_prefix": prefix}},
                }

            def run(reference: str, prefix: str) -> tuple[float, set]:
                result = server.run_prompt(graph(reference, prefix))
                cached = set()
                for kind, data in (result.history.get("status") or {}).get("messages", []):
                    if kind == "execution_cached":
                        cached.update(data.get("nodes", []))
                return result.seconds, {"image", "encoder", "encode", "save"} - cached

            cold_seconds, cold_ran = run("a.png", "cold")
            same, changed, same_ran, changed_ran = [], [], [], []
            reference = "a.png"
            for rep in range(args.reps):
                seconds, ran = run(reference, f"same{rep}")  # re-queued: nothing changed but the save prefix
                same.append(seconds)
                same_ran.append(ran)
                reference = "b.png" if reference == "a.png" else "a.png"
                seconds, ran = run(reference, f"changed{rep}")  # the other reference image
                changed.append(seconds)
                changed_ran.append(ran)
        finally:
            server.stop()

    def nodes(runs: list[set]) -> str:
        encoded = sum("encode" in ran for ran in runs)
        loaded = sum("encoder" in ran for ran in runs)
        return f"encode ran {encoded}/{len(runs)}, encoder loaded {loaded}/{len(runs)}"

    median_same, median_changed = median(same), median(changed)
    return [
        f"ComfyUI server, {'scaled-down test tower' if args.small else 'ViT-H/14'} from models/clip_vision (fp16 file), "
        f"OMP_NUM_THREADS={args.threads or 1}, {args.reps} interleaved pairs of queues",
        "| queue | median wall time (s) | nodes that ran | ratio to a changed reference |",
        "|---|---|---|---|",
        f"| first (loads the encoder) | {cold_seconds:.2f} | {', '.join(sorted(cold_ran))} | - |",
        f"| changed reference image | {median_changed:.2f} | {nodes(changed_ran)} | 1.00x |",
        f"| re-queued, same reference | {median_same:.2f} | {nodes(same_ran)} | {median_same / median_changed:.2f}x |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; the server gets 1)")
    parser.add_argument("--small", action="store_true", help="a narrow tower with ViT-H's output width, to try the script")
    parser.add_argument("--skip-server", action="store_true", help="only part 1")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, no GPU" if not torch.cuda.is_available()
          else f"machine: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("\n".join(part_one(args)))
    if not args.skip_server:
        print()
        print("\n".join(part_two(args)))


if __name__ == "__main__":
    main()
