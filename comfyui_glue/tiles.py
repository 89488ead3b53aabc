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


CUBIQ_TILE = 256  # cubiq's tile side: the encoder then sees each tile at 224


def _resize_lanczos(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B, H, W, 3] in 0..1 through PIL's Lanczos filter, 8 bits per channel as PIL holds them."""
    from PIL import Image

    out = []
    for image in images:
        pixels = (image.clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()  # truncated, as torchvision's ToPILImage does
        resized = Image.fromarray(pixels).resize((width, height), resample=Image.Resampling.LANCZOS)
        out.append(torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(height, width, 3))
    return torch.stack(out).float() / 255


def _center_crop(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's CenterCrop on the last two axes (its rounding: the extra pixel goes to the far side)."""
    top, left = int(round((tensor.shape[-2] - height) / 2.0)), int(round((tensor.shape[-1] - width) / 2.0))
    return tensor[..., top : top + height, left : left + width]


def _resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(mask[:, None], size=(height, width), mode="bicubic", antialias=True,
                                           align_corners=False)[:, 0]


def cubiq_tiles(images: torch.Tensor, mask: torch.Tensor | None = None,
                tile: int = CUBIQ_TILE) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The tiles cubiq's IPAdapter Tiled cuts, and each tile's mask, so a migrated graph applies the same.

    A near-square reference (aspect between 0.75 and 1.33) is center-cropped to a square and resized to 2×2 tiles;
    any other is resized to ``tile`` on its short side (Lanczos) and cut to at most 4 tiles along its long side.
    Tiles overlap evenly where the side is not a multiple of ``tile``, and each tile's mask is the (optional) attention
    mask inside the tile's square and 0 elsewhere, so the masks overlap too. Returns one [B, tile, tile, 3] batch per
    tile position, row by row, and the masks [T, M, H', W'] (M: the mask's batch, 1 without a mask).
    """
    _, height, width, _ = images.shape
    mask = torch.ones(1, height, width) if mask is None else mask.reshape(-1, *mask.shape[-2:]).float()
    mask = _resize_mask(mask, height, width)
    pixels = images.permute(0, 3, 1, 2)
    if 0.75 < height / width < 1.33:
        side = min(height, width)
        pixels, mask = _center_crop(pixels, side, side), _center_crop(mask, side, side)
        size = (tile * 2, tile * 2)  # (width, height)
    else:
        size = (int(tile * width / height), tile) if height < width else (tile, int(tile * height / width))
    resized = _resize_lanczos(pixels.permute(0, 2, 3, 1), *size)
    mask = _resize_mask(mask, size[1], size[0])
    if height / width > 4 or height / width < 0.25:
        crop = (tile, tile * 4) if height < width else (tile * 4, tile)  # (height, width)
        resized = _center_crop(resized.permute(0, 3, 1, 2), *crop).permute(0, 2, 3, 1)
        mask = _center_crop(mask, *crop)
    _, height, width, _ = resized.shape
    across, down = math.ceil(width / tile), math.ceil(height / tile)
    step_x = tile - max(0, (across * tile - width) / max(across - 1, 1))
    step_y = tile - max(0, (down * tile - height) / max(down - 1, 1))
    tiles, masks = [], []
    for row in range(down):
        for column in range(across):
            x, y = int(column * step_x), int(row * step_y)
            tiles.append(resized[:, y : y + tile, x : x + tile])
            own = torch.zeros_like(mask)
            own[:, y : y + tile, x : x + tile] = mask[:, y : y + tile, x : x + tile]
            masks.append(own)
    return tiles, torch.stack(masks)
