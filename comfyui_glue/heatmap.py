"""Where the image prompt lands: the image term's strength over the picture, per block and averaged.

A recording holds, for every patched layer, how large the image term's output is at each of
the layer's query positions (one UNet call, the conditional half, the first latent). The
positions of a layer form a grid of the latent at that UNet level; each grid is brought to
the latent's size and the grids are averaged per ComfyUI block and over all layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ipadapter.registry import Family
from ..ipadapter.image_prompt import token_grid


def to_latent(strength: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """A layer's per-position strength [tokens] as a map of the latent's size [H, W]."""
    height, width = token_grid(latent_height, latent_width, strength.shape[-1])
    grid = strength.reshape(1, 1, height, width).float()
    return F.interpolate(grid, size=(latent_height, latent_width), mode="bilinear", align_corners=False)[0, 0]


def block_maps(records: dict[int, torch.Tensor], architecture: Family, latent_height: int,
               latent_width: int) -> dict[str, torch.Tensor]:
    """``{"average": map, "input 4": map, ...}``, each [H, W], from each layer's strength by official key."""
    by_block: dict[tuple[str, int], list[torch.Tensor]] = {}
    for key, strength in records.items():
        block = architecture.layer_by_key[key].comfy_block
        by_block.setdefault(block, []).append(to_latent(strength, latent_height, latent_width))
    if not by_block:
        raise ValueError("no image-prompt attention was recorded; expected a MODEL patched by Apply IP-Adapter, "
                         "with a weight other than 0 and the step inside its start/end window")
    maps = {"average": torch.stack([m for ms in by_block.values() for m in ms]).mean(0)}
    for block in architecture.blocks:
        if block in by_block:
            maps[f"{block[0]} {block[1]}"] = torch.stack(by_block[block]).mean(0)
    return maps


def colorize(heat: torch.Tensor) -> torch.Tensor:
    """A map [H, W] scaled to its maximum, as black -> red -> yellow -> white [H, W, 3]."""
    scaled = heat / heat.max().clamp_min(1e-12)
    return torch.stack([(3 * scaled).clamp(0, 1), (3 * scaled - 1).clamp(0, 1), (3 * scaled - 2).clamp(0, 1)], dim=-1)


def as_images(maps: dict[str, torch.Tensor], scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coloured maps [N, H·scale, W·scale, 3] (average first, then each block) and the average as a mask in 0..1."""
    enlarged = {name: F.interpolate(m[None, None], scale_factor=scale, mode="bilinear", align_corners=False)[0, 0]
                for name, m in maps.items()}
    images = torch.stack([colorize(m) for m in enlarged.values()])
    average = enlarged["average"]
    return images, (average / average.max().clamp_min(1e-12))[None]
