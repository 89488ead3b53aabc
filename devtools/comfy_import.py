"""ComfyUI's ``comfy`` package and this pack imported into the current process, and random weights for
ComfyUI's modules (its layers skip their own init).

The lowest layer of the devtools that touch ComfyUI: ``comfyui_harness`` (servers, random
checkpoints), ``sdxl_models`` and ``comfy_inprocess`` build on it.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .comfyui_setup import ensure_comfyui

REPO_ROOT = Path(__file__).resolve().parent.parent
# A dash in the name proves the pack imports under any folder name (ComfyUI
# imports a custom-node folder as a package named after the folder).
PACK_FOLDER_NAME = "ComfyUI-IPAdapter-Kit-under-test"


def import_comfy(comfyui: Path | None = None):
    """Import ComfyUI's ``comfy`` package into this process in CPU mode and return it.

    Puts the ComfyUI folder first on sys.path (so ComfyUI's own top-level
    modules, ``folder_paths``, ``nodes``, ``comfy_api``…, win over same-named
    ones) and sets ``args.cpu`` before ``comfy.model_management`` is imported:
    that module picks the device once, at import. One process holds one comfy.
    """
    comfyui = Path(comfyui or ensure_comfyui()).resolve()
    loaded = sys.modules.get("comfy")
    if loaded is not None:
        where = Path(list(loaded.__path__)[0]).resolve().parent  # comfy/ has no __init__.py
        if where != comfyui:
            raise RuntimeError(f"comfy is already imported from {where}, not {comfyui}")
    if str(comfyui) not in sys.path:
        sys.path.insert(0, str(comfyui))
    import comfy.options  # noqa: F401  (argument parsing stays off: args come from parse_args([]))
    import comfy.cli_args

    if "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = True
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    if getattr(device, "type", str(device)) != "cpu":
        raise RuntimeError(f"comfy.model_management was imported before CPU mode was set (device {device})")
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    return comfy


def import_pack(package_name: str = PACK_FOLDER_NAME, root: Path = REPO_ROOT, comfyui: Path | None = None):
    """Import a node pack (default: this repository) the way ComfyUI does, with comfy in-process.

    ComfyUI loads a custom-node folder as a package named after the folder
    (March 2024) or after its full path (2025), dashes and all, so only
    relative imports inside the pack work. Returns the package; its
    ``NODE_CLASS_MAPPINGS`` hold the node classes.
    """
    import_comfy(comfyui)
    if package_name in sys.modules:
        return sys.modules[package_name]
    spec = importlib.util.spec_from_file_location(package_name, Path(root) / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[package_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[package_name]
        raise
    return module


def reset_all_parameters(module, seed: int) -> None:
    """Random-initialise every parameter with torch's default init, seeded.

    ComfyUI builds its models with ``comfy.ops.disable_weight_init`` (or
    ``manual_cast``), whose layers skip ``reset_parameters``: their weights are
    uninitialised memory until a checkpoint is loaded. This calls the
    ``reset_parameters`` of the torch.nn class behind each layer, and draws the
    few parameters that belong to no such layer from N(0, 0.02) (scalars: 1).
    """
    import torch

    torch.manual_seed(seed)
    reached = set()
    for layer in module.modules():
        reset = torch_reset_parameters(type(layer))
        if reset is not None:
            reset(layer)
            reached.update(id(p) for p in layer.parameters(recurse=False))
    with torch.no_grad():  # parameters outside torch.nn layers: CLIP's class_embedding, logit_scale
        for parameter in module.parameters():
            if id(parameter) not in reached:
                parameter.normal_(0.0, 0.02) if parameter.dim() else parameter.fill_(1.0)


def torch_reset_parameters(layer_class):
    """``reset_parameters`` of the first torch.nn class in ``layer_class``'s MRO that defines one, or None."""
    for klass in layer_class.__mro__:
        if klass.__module__.startswith("torch.nn.modules") and "reset_parameters" in vars(klass):
            return vars(klass)["reset_parameters"]
    return None


def random_module(build, seed: int):
    """``build()``, a ComfyUI module (its layers skip their init), with random weights."""
    import torch

    with torch.no_grad():  # ComfyUI's CLIP __init__ writes text_projection in place, as under its inference mode
        module = build()
    reset_all_parameters(module, seed)
    return module
