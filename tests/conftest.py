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
from devtools.heavy_fixtures import colour_shapes_quick_build

COLOUR_SHAPES_BUILD = pytest.StashKey()


@pytest.hookimpl(trylast=True)  # after the -m / -k deselection
def pytest_collection_modifyitems(config, items):
    """The colour_shapes run trains for minutes: it starts now, in a process of its own beside the other
    tests (unless its result for this code is cached), and the tests that read it go last."""
    late = [item for item in items if "colour_shapes_quick" in getattr(item, "fixturenames", ())]
    if late:
        items[:] = [item for item in items if item not in late] + late
        config.stash[COLOUR_SHAPES_BUILD] = colour_shapes_quick_build()


def pytest_unconfigure(config):
    build = config.stash.get(COLOUR_SHAPES_BUILD, None)
    if build is not None:
        build.stop()


@pytest.fixture(scope="session")
def colour_shapes_quick(request) -> dict:
    """The results of ``python -m experiments.colour_shapes --quick``, built once for this code and cached."""
    build = request.config.stash.get(COLOUR_SHAPES_BUILD, None) or colour_shapes_quick_build()
    return build.result()


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
