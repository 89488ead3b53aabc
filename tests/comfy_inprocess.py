"""Real ComfyUI, imported in this process, for fast tests of the patching semantics.

The ComfyUI checkout comes from ``COMFYUI_PATH`` or the pinned copy that
``tests/comfyui_setup.py`` makes. This repository is imported as a package
under a name with no relation to its folder, as ComfyUI would import it.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "ipadapter_sd15_pack_under_test"


def import_comfy(comfyui: Path):
    if str(comfyui) not in sys.path:
        sys.path.insert(0, str(comfyui))
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  parses --cpu before model_management reads it
        import comfy.model_management
    finally:
        sys.argv = argv
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    return comfy


def import_pack():
    """This repository as a package under an unrelated name, as ComfyUI imports a custom-node folder.

    The package's ``__init__`` is not run, so one submodule can be tested alone.
    """
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        sys.modules[PACK_NAME] = importlib.util.module_from_spec(spec)
    return sys.modules[PACK_NAME]


def pack_module(name: str):
    import_pack()
    return importlib.import_module(f"{PACK_NAME}.{name}")


def sd15_unet_config(model_channels: int = 64) -> dict:
    """SD1.5's UNet layout (16 cross-attention layers, 8 heads) at any width."""
    return {
        "context_dim": 768, "model_channels": model_channels, "use_linear_in_transformer": False,
        "adm_in_channels": None, "use_temporal_attention": False, "in_channels": 4, "out_channels": 4,
        "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "transformer_depth_middle": 1, "num_heads": 8, "use_spatial_transformer": True, "legacy": False,
        "image_size": 32, "num_head_channels": -1, "use_checkpoint": False, "dims": 2,
    }


def init_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """ComfyUI's ops skip weight init; give every layer PyTorch's default init."""
    torch.manual_seed(seed)
    for m in module.modules():
        for cls in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(m, cls):
                cls.reset_parameters(m)
                break


def build_model_patcher(comfy, model_channels: int = 64, seed: int = 0):
    """A real ComfyUI ModelPatcher around an SD1.5-layout BaseModel with random weights."""
    unet_config = sd15_unet_config(model_channels)
    model_config = comfy.supported_models.SD15(unet_config)
    model = comfy.model_base.BaseModel(model_config, device=torch.device("cpu"))
    init_weights(model.diffusion_model, seed)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def noise_prediction(patcher, latent, sigma, context, cond_or_uncond=(0, 1)):
    """ε from ComfyUI's apply_model, with the model options a sampler would pass."""
    model = patcher.model
    options = {**patcher.model_options["transformer_options"], "cond_or_uncond": list(cond_or_uncond), "sigmas": sigma}
    with torch.no_grad():
        denoised = model.apply_model(latent, sigma, c_crossattn=context, transformer_options=options)
    return (latent - denoised) / sigma.view(-1, 1, 1, 1)
