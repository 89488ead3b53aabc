"""Heavy test fixtures built once, keyed by what they depend on, and cached between runs.

A fixture's key is a digest of the source files it is built from (every ``.py``, ``.json``
and ``.yaml`` under the given paths), the torch version and the ComfyUI under test: change
any of them and it is built again; otherwise a later run reuses the cached result.
:class:`BackgroundBuild` starts the build in a process of its own as soon as the test
session knows it needs it, so it runs beside the other tests instead of before its own.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

from .comfy_import import REPO_ROOT
from .comfyui_setup import cache_root, ensure_comfyui

SOURCE_SUFFIXES = (".py", ".json", ".yaml")


def source_digest(paths: list[str], *extra: str) -> str:
    """sha256 over the repository files under ``paths`` (names and contents) and ``extra``, 16 hex digits."""
    digest = hashlib.sha256()
    for relative in paths:
        root = REPO_ROOT / relative
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES
                                                     and "__pycache__" not in p.parts)
        for path in files:
            digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    for item in extra:
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()[:16]


def environment_key() -> str:
    """The torch version and the ComfyUI under test (its folder and the wheel it came from)."""
    import torch

    comfyui = ensure_comfyui()
    marker = comfyui / ".ipadapter-tests-ready"
    return f"torch {torch.__version__}; ComfyUI {comfyui} {marker.read_text().strip() if marker.is_file() else ''}"


class BackgroundBuild:
    """A fixture built by ``command`` into a folder of the cache, in a subprocess started at once.

    The command gets the folder to fill as its last argument and must write ``result_name`` there
    last. The folder is ``<cache>/<name>/<key>``: a finished one is reused without running anything.
    """

    def __init__(self, name: str, key: str, command: list[str], result_name: str = "results.json"):
        self.folder = cache_root() / name / key
        self.result_path = self.folder / result_name
        self.process: subprocess.Popen | None = None
        self.partial = self.folder.with_name(self.folder.name + ".partial")
        if not self.result_path.is_file():
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
            self.log_path = self.partial / "build.log"
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen([*command, str(self.partial)], cwd=REPO_ROOT, stdout=log,
                                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def result(self, timeout: float = 3600) -> dict:
        """The build's JSON result, once it has finished (a failure raises with the end of its log)."""
        if self.process is not None:
            code = self.process.wait(timeout=timeout)
            self.process = None
            if code != 0:
                tail = self.log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"building {self.folder.parent.name} failed (exit {code}):\n{tail}")
            shutil.rmtree(self.folder, ignore_errors=True)
            self.partial.rename(self.folder)
            # the paths the build recorded point into the folder it filled
            self.result_path.write_text(self.result_path.read_text().replace(str(self.partial), str(self.folder)))
        return json.loads(self.result_path.read_text())

    def stop(self) -> None:
        """End an unfinished build (the session ended without asking for it); its partial folder is dropped."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process is not None:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.process = None


def colour_shapes_quick_build() -> BackgroundBuild:
    """The colour_shapes experiment at its ``--quick`` settings (its test's fixture): data, base model, our trainer,
    sampling through ComfyUI with this pack's nodes. It depends on nearly all of the product."""
    key = source_digest(["experiments/colour_shapes", "training", "ipadapter", "nodes.py", "patcher.py", "__init__.py",
                         "comfyui_glue", "devtools/comfy_import.py"], environment_key())
    command = [sys.executable, "-m", "experiments.colour_shapes", "--quick", "--output_dir"]
    return BackgroundBuild("colour-shapes-quick", key, command)


def gpu_bench_dry_run_build() -> BackgroundBuild:
    """``bench/gpu.py --cpu --small``, the GPU run's dry run (its test reads the JSON and the Markdown it writes)."""
    key = source_digest(["bench", "training", "ipadapter", "nodes.py", "patcher.py", "__init__.py", "comfyui_glue",
                         "devtools"], environment_key())
    command = [sys.executable, str(REPO_ROOT / "bench" / "gpu.py"), "--cpu", "--small", "--out"]
    return BackgroundBuild("gpu-bench-dry-run", key, command, result_name="gpu_bench.json")


# fixture name -> its build: tests/conftest.py starts each one a collected test needs
BUILDS = {"colour_shapes_quick": colour_shapes_quick_build, "gpu_bench_dry_run": gpu_bench_dry_run_build}
