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
