import os

# On a 2-core machine with the other core busy (a ComfyUI server, a second
# training process), torch's second thread turns every small op into a wait:
# one thread is many times faster there. Set before anything imports torch;
# subprocesses inherit it. An explicit OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from comfyui_harness import comfyui_path, comfyui_server, sd15_checkpoint, sd15_checkpoint_name  # noqa: F401


@pytest.fixture(scope="session")
def comfy(comfyui_path):
    """ComfyUI's ``comfy`` package, imported into the test process in CPU mode."""
    from comfyui_harness import import_comfy

    return import_comfy(comfyui_path)


@pytest.fixture(scope="session")
def vit_h_file(tmp_path_factory):
    """A full-size OpenCLIP ViT-H/14 with random weights in the transformers format ComfyUI users have (fp16)."""
    import torch
    from test_encoder import transformers_model

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
