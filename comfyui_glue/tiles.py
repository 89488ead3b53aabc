"""Seeing more of a reference than one 224² center crop.

- Tiled: a tall or wide reference becomes squares along its long side (each a
  reference of its own), with masks that say which part of the picture each
  square covers, instead of losing the sides to the center crop.
- Detail ("enhancer"): the square view is also cut into k×k tiles, each seen at
  the encoder's full resolution, and their features are blended into the
  single embedding.

Images are ComfyUI's layout, [B, H, W, 3] in 0..1.
"""
from __future__ import annotations

import math

import torch


def tile_offsets(long: int, short: int) -> list[int]:
    """Start of each short×short square along a side of length ``long``: as few as cover it, evenly spaced."""
    count = max(1, math.ceil(long / short - 1e-6))
    if count == 1:
        return [(long - short) // 2]
    return [round(i * (long - short) / (count - 1)) for i in range(count)]


def tile_reference(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Square tiles of every image (in image order) and, for each tile, its mask over the picture [T, H, W].

    Where tiles overlap, each point belongs to the tile whose centre is nearest, so the masks
    split the picture. A square image is one tile: itself.
    """
    _, height, width, _ = images.shape
    short, long = min(height, width), max(height, width)
    offsets = tile_offsets(long, short)
    along = torch.arange(long, dtype=torch.float32) + 0.5  # pixel centres
    centres = torch.tensor([o + short / 2 for o in offsets])
    owner = (along[:, None] - centres[None]).abs().argmin(dim=1)
    tiles, masks = [], []
    for index, offset in enumerate(offsets):
        strip = (owner == index).float()
        if height >= width:
            tiles.append(images[:, offset : offset + short])
            masks.append(strip[:, None].expand(height, width))
        else:
            tiles.append(images[:, :, offset : offset + short])
            masks.append(strip[None, :].expand(height, width))
    # order: image 0's tiles, then image 1's, ...
    tiles = torch.stack(tiles, dim=1).flatten(0, 1)
    return tiles, torch.stack(masks)


def detail_tiles(square: torch.Tensor, per_side: int) -> torch.Tensor:
    """A square view [B, S, S, 3] cut into per_side² tiles [B·per_side², S/per_side, S/per_side, 3], row by row."""
    batch, size, _, channels = square.shape
    side = size // per_side
    square = square[:, : side * per_side, : side * per_side]
    tiles = square.reshape(batch, per_side, side, per_side, side, channels).permute(0, 1, 3, 2, 4, 5)
    return tiles.reshape(batch * per_side * per_side, side, side, channels)


def blend_detail(view: torch.Tensor, tiles: torch.Tensor, ratio: float) -> torch.Tensor:
    """``ratio`` of the whole view's features plus the rest from the mean of its tiles' features.

    ``view`` [B, ...], ``tiles`` [B·k, ...] (each image's k tiles together).
    """
    per_image = tiles.shape[0] // view.shape[0]
    mean = tiles.reshape(view.shape[0], per_image, *tiles.shape[1:]).mean(dim=1)
    return ratio * view + (1 - ratio) * mean


def center_square(images: torch.Tensor) -> torch.Tensor:
    """The largest centred square of each image [B, H, W, 3]."""
    _, height, width, _ = images.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return images[:, top : top + side, left : left + side]
