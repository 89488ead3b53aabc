"""Real ComfyUI SDXL UNets (base and refiner layouts) with random weights, and the same weights in diffusers.

Scaled down means only a narrower ``model_channels``: the block layout, the 70
cross-attention layers (transformer depths 2 and 10), the 2048-wide context,
the 2816-wide added conditioning and the heads of 64 channels stay SDXL's.
"""
from __future__ import annotations

from .comfy_import import import_comfy, reset_all_parameters

# comfy/model_detection.py's SDXL config (March 2024) without its dtype; supported_models.SDXL matches it.
SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# The same file's SDXL refiner: 4 levels, 4-deep transformers, CLIP-G's 1280-wide context only.
SDXL_REFINER_UNET_CONFIG = {
    **SDXL_UNET_CONFIG, "adm_in_channels": 2560, "model_channels": 384, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [0, 0, 4, 4, 4, 4, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 4,
    "context_dim": 1280, "transformer_depth_output": [0, 0, 0, 4, 4, 4, 4, 4, 4, 0, 0, 0],
}
POOLED_WIDTH = 1280  # CLIP-G's pooled output, the first part of the added conditioning y


def _scaled(config: dict, model_channels: int) -> dict:
    if model_channels % 32:
        raise ValueError("model_channels must be a multiple of 32 (GroupNorm with 32 groups)")
    return {**config, "model_channels": model_channels}


def sdxl_unet_config(model_channels: int = 320) -> dict:
    return _scaled(SDXL_UNET_CONFIG, model_channels)


def sdxl_refiner_unet_config(model_channels: int = 384) -> dict:
    return _scaled(SDXL_REFINER_UNET_CONFIG, model_channels)


def _model_patcher(comfy, model):
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=comfy.model_management.unet_offload_device())


def build_sdxl_base_model(model_channels: int = 320, seed: int = 0, dtype=None):
    """A ``comfy.model_base.SDXL`` (built by ``comfy.supported_models.SDXL``), random weights, on the CPU."""
    import torch

    comfy = import_comfy()
    model_config = comfy.supported_models.SDXL(sdxl_unet_config(model_channels))
    model_config.set_inference_dtype(dtype or torch.float32, None)
    model = model_config.get_model({})
    reset_all_parameters(model.diffusion_model, seed)
    return model.eval()


def build_sdxl_model_patcher(model_channels: int = 64, seed: int = 0, dtype=None):
    """A real ``ModelPatcher`` around a random SDXL UNet; 64 channels: ~140 M parameters (SDXL: 320, 2.6 B).

    ``noise_prediction(patcher, x, sigma, context, y=sdxl_added_conditioning(...))`` runs it.
    """
    return _model_patcher(import_comfy(), build_sdxl_base_model(model_channels, seed, dtype))


def build_sdxl_refiner_patcher(model_channels: int = 64):
    """A ``ModelPatcher`` around an SDXL-refiner UNet (``comfy.model_base.SDXLRefiner``); weights left unset."""
    import torch

    comfy = import_comfy()
    model_config = comfy.supported_models.SDXLRefiner(sdxl_refiner_unet_config(model_channels))
    model_config.set_inference_dtype(torch.float32, None)
    return _model_patcher(comfy, model_config.get_model({}))


def sdxl_added_conditioning(model, pooled, height: int, width: int):
    """ComfyUI's ``y`` for SDXL (pooled CLIP-G output + size embeddings), as its CLIPTextEncode path builds it."""
    return model.encode_adm(pooled_output=pooled, height=height, width=width)


def sdxl_time_ids(height: int, width: int, batch: int):
    """diffusers' ``time_ids`` for the same ``y``: original size, crop (0, 0), target size."""
    import torch

    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(batch, -1)


def diffusers_sdxl_unet_from_comfy(comfy, patcher, width: int):
    """A diffusers SDXL UNet, ``width`` channels wide, with the weights of a ComfyUI SDXL UNet (ComfyUI's key map)."""
    from ipadapter.registry.families import SDXL
    from training.models import build_embedded_unet

    unet = build_embedded_unet(SDXL, width)  # the trainer's SDXL layout (heads of 64, 2816-wide added conditioning)
    comfy_weights = patcher.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(sdxl_unet_config(width))
    # the map lists optional layers and both names of label_emb (class_embedding, add_embedding)
    wanted = unet.state_dict().keys()
    state = {dk: comfy_weights[ck] for dk, ck in mapping.items() if ck in comfy_weights and dk in wanted}
    unet.load_state_dict(state, strict=True)
    unused = set(comfy_weights) - {mapping[dk] for dk in state}
    assert not unused, sorted(unused)[:3]
    return unet.eval()
