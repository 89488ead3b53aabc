import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    """A ComfyUI checkout: COMFYUI_PATH, or the pinned copy made by tests/comfyui_setup.py."""
    from comfyui_setup import ensure_comfyui

    return Path(ensure_comfyui())


@pytest.fixture(scope="session")
def comfy(comfyui_path):
    from comfy_inprocess import import_comfy

    return import_comfy(comfyui_path)
