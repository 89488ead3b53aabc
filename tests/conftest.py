import os

# On a 2-core machine with the other core busy (a ComfyUI server, a second
# training process), torch's second thread turns every small op into a wait:
# one thread is many times faster there. Set before anything imports torch;
# subprocesses inherit it. An explicit OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest

# pytest.ini puts the repository root on sys.path: the helpers are devtools' (shared with bench/ and experiments/)
from devtools.comfy_import import PACK_FOLDER_NAME, REPO_ROOT, import_comfy
from devtools.comfyui_harness import ComfyUIError, sd15_checkpoint_path, start_comfyui_server
from devtools.comfyui_setup import ensure_comfyui
from devtools.heavy_fixtures import BUILDS

STARTED_BUILDS = pytest.StashKey()


@pytest.hookimpl(trylast=True)  # after the -m / -k deselection
def pytest_collection_modifyitems(config, items):
    """The heavy fixtures (devtools.heavy_fixtures.BUILDS: the colour_shapes run, the GPU bench's dry run) take
    minutes: each one a collected test needs starts now, in a process of its own beside the other tests
    (unless its result for this code is cached), and the tests that read them go last."""
    wanted = {name for item in items for name in getattr(item, "fixturenames", ()) if name in BUILDS}
    late = [item for item in items if wanted & set(getattr(item, "fixturenames", ()))]
    items[:] = [item for item in items if item not in late] + late
    config.stash[STARTED_BUILDS] = {name: BUILDS[name]() for name in sorted(wanted)}


def pytest_unconfigure(config):
    for build in config.stash.get(STARTED_BUILDS, {}).values():
        build.stop()


def built(request, name: str):
    build = request.config.stash.get(STARTED_BUILDS, {}).get(name) or BUILDS[name]()
    return build, build.result()


@pytest.fixture(scope="session")
def colour_shapes_quick(request) -> dict:
    """The results of ``python -m experiments.colour_shapes --quick``, built once for this code and cached."""
    return built(request, "colour_shapes_quick")[1]


@pytest.fixture(scope="session")
def gpu_bench_dry_run(request) -> tuple[dict, str]:
    """``bench/gpu.py --cpu --small``: its JSON report and Markdown section, built once for this code and cached."""
    build, report = built(request, "gpu_bench_dry_run")
    return report, (build.folder / "gpu_bench.md").read_text()


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    """The ComfyUI under test: $COMFYUI_PATH or the pinned copy (set up on first use)."""
    return ensure_comfyui()


@pytest.fixture(scope="session")
def comfyui_server(comfyui_path, tmp_path_factory):
    """One ComfyUI server per test session, with this repository as a custom node."""
    base = tmp_path_factory.mktemp("comfyui-base")
    server = start_comfyui_server(base, {PACK_FOLDER_NAME: REPO_ROOT}, comfyui_path)
    try:
        if server.custom_node_import_failed(PACK_FOLDER_NAME):
            raise ComfyUIError(f"ComfyUI could not import the pack:\n{server.log_tail()}")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sd15_checkpoint() -> Path:
    """The cached full-size random SD1.5 checkpoint file."""
    return sd15_checkpoint_path()


@pytest.fixture(scope="session")
def sd15_checkpoint_name(comfyui_server, sd15_checkpoint) -> str:
    """The checkpoint linked into the server's models/checkpoints; its name for CheckpointLoaderSimple."""
    link = comfyui_server.models_dir("checkpoints") / sd15_checkpoint.name
    if not link.exists():
        link.symlink_to(sd15_checkpoint)
    return sd15_checkpoint.name


@pytest.fixture(scope="session")
def comfy(comfyui_path):
    """ComfyUI's ``comfy`` package, imported into the test process in CPU mode."""
    return import_comfy(comfyui_path)


@pytest.fixture(scope="session")
def vit_h_file(tmp_path_factory):
    """A full-size OpenCLIP ViT-H/14 with random weights in the transformers format ComfyUI users have (fp16)."""
    import torch

    from devtools.clip_vision import transformers_model

    folder = tmp_path_factory.mktemp("vit_h")
    # std 0.02 keeps 32 layers' activations at CLIP's usual magnitude (a wider spread inflates them)
    model = transformers_model(width=1280, layers=32, heads=16, patch=14, image=224, embed_dim=1024, scale=0.02)
    model.to(torch.float16).save_pretrained(folder)
    path = folder / "model.safetensors"
    assert path.is_file()
    return path


@pytest.fixture(autouse=True, scope="module")
def release_memory_after_each_module():
    """Free what a module's models held and give the heap back to the OS (glibc keeps it otherwise),
    so the big-model modules do not add up over the suite on a 24 GiB machine."""
    yield
    import ctypes
    import gc
    import sys

    # ComfyUI's model management keeps every model it loaded in this process (a CLIP vision
    # model, a UNet) until something asks for room: let go of them with the module
    model_management = sys.modules.get("comfy.model_management")
    if model_management is not None:
        model_management.unload_all_models()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
