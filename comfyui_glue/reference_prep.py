"""Reference images before the encoder: a square view chosen by the user, and noise for the negative image.

Images are ComfyUI's layout, [B, H, W, 3] floats in 0..1, in and out.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..ipadapter.preprocess import as_channels_first
from .interface import CROP_POSITIONS, INTERPOLATIONS, NOISE_TYPES


def prepare_reference(images: torch.Tensor, crop_position: str = "center", interpolation: str = "LANCZOS",
                      sharpening: float = 0.0, size: int = 224) -> torch.Tensor:
    """A ``size``² view of each image: the square at ``crop_position`` (or the whole image padded
    with black), resized with PIL's filter, optionally sharpened."""
    if crop_position not in CROP_POSITIONS:
        raise ValueError(f"crop position '{crop_position}' is unknown; expected one of {', '.join(CROP_POSITIONS)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation '{interpolation}' is unknown; expected one of {', '.join(INTERPOLATIONS)}")
    pixels = _square(as_channels_first(images), crop_position)
    resample = Image.Resampling[interpolation]
    resized = []
    for picture in pixels:
        array = (picture.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        out = Image.fromarray(array).resize((size, size), resample=resample)
        resized.append(torch.from_numpy(np.asarray(out, dtype=np.float32) / 255).permute(2, 0, 1))
    pixels = torch.stack(resized)
    if sharpening > 0:
        pixels = contrast_adaptive_sharpening(pixels, sharpening)
    return pixels.permute(0, 2, 3, 1)


def _square(pixels: torch.Tensor, position: str) -> torch.Tensor:
    height, width = pixels.shape[-2:]
    if position == "pad":
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        return F.pad(pixels, (left, side - width - left, top, side - height - top))
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    top = {"top": 0, "bottom": height - side}.get(position, top)
    left = {"left": 0, "right": width - side}.get(position, left)
    return pixels[..., top : top + side, left : left + side]


def contrast_adaptive_sharpening(pixels: torch.Tensor, amount: float) -> torch.Tensor:
    """Sharpen [B, 3, H, W] more where local contrast is low (AMD's CAS): ``amount`` 0..1."""
    padded = F.pad(pixels, (1, 1, 1, 1), mode="replicate")
    neighbours = torch.stack([padded[..., :-2, 1:-1], padded[..., 2:, 1:-1], padded[..., 1:-1, :-2], padded[..., 1:-1, 2:]])
    low = torch.minimum(neighbours.amin(0), pixels)
    high = torch.maximum(neighbours.amax(0), pixels)
    headroom = (torch.minimum(low, 1 - high) / high.clamp_min(1e-5)).clamp(0, 1).sqrt()
    weight = -headroom / (8 - 3 * amount)  # the peak runs from -1/8 to -1/5 as amount goes 0..1
    return ((pixels + weight * neighbours.sum(0)) / (1 + 4 * weight)).clamp(0, 1)


def make_noise(noise_type: str, strength: float, blur: int = 0, images: torch.Tensor | None = None,
               seed: int = 0, size: int = 224) -> torch.Tensor:
    """A negative image: noise made from the reference (its centre square at ``size``²) or from black.

    fade: the image mixed with uniform noise; dissolve: that share of the pixels replaced by noise;
    gaussian: the image plus normal noise; shuffle: the image's tiles shuffled and mirrored,
    then noise on top. ``blur`` is a Gaussian kernel size in pixels. Seeded: the same inputs give
    the same image.
    """
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise type '{noise_type}' is unknown; expected one of {', '.join(NOISE_TYPES)}")
    if images is None:
        pixels = torch.zeros(1, 3, size, size)
    else:
        pixels = as_channels_first(prepare_reference(images, "center", "BICUBIC", 0.0, size))
    generator = torch.Generator().manual_seed(seed)

    def uniform():
        return torch.rand(pixels.shape, generator=generator)

    if noise_type == "fade":
        noisy = pixels * (1 - strength) + uniform() * strength
    elif noise_type == "dissolve":
        replaced = (torch.rand(pixels[:, :1].shape, generator=generator) < strength).float()  # whole pixels
        noisy = pixels * (1 - replaced) + uniform() * replaced
    elif noise_type == "gaussian":
        noisy = pixels + torch.randn(pixels.shape, generator=generator) * strength
    else:
        noisy = _shuffle_tiles(pixels, strength, generator).flip(-1, -2)
        grain = torch.randn(pixels.shape, generator=generator) * (strength * 0.75)
        noisy = noisy * (1 - grain) + grain
    noisy = noisy.clamp(0, 1)
    if blur > 0:
        noisy = gaussian_blur(noisy, blur | 1)
    return noisy.permute(0, 2, 3, 1)


def _shuffle_tiles(pixels: torch.Tensor, strength: float, generator: torch.Generator, grid: int = 8) -> torch.Tensor:
    """Move a ``strength`` share of the image's grid×grid tiles to random places."""
    batch, channels, height, width = pixels.shape
    th, tw = height // grid, width // grid
    tiles = pixels[..., : th * grid, : tw * grid].reshape(batch, channels, grid, th, grid, tw)
    tiles = tiles.permute(0, 2, 4, 1, 3, 5).reshape(batch, grid * grid, channels, th, tw)
    order = torch.arange(grid * grid)
    moved = torch.randperm(grid * grid, generator=generator)[: round(strength * grid * grid)]
    order[moved] = moved[torch.randperm(len(moved), generator=generator)]
    tiles = tiles[:, order].reshape(batch, grid, grid, channels, th, tw).permute(0, 3, 1, 4, 2, 5)
    out = pixels.clone()
    out[..., : th * grid, : tw * grid] = tiles.reshape(batch, channels, th * grid, tw * grid)
    return out


def gaussian_blur(pixels: torch.Tensor, kernel_size: int) -> torch.Tensor:
    sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8  # the sigma OpenCV and torchvision derive from the size
    x = torch.arange(kernel_size, dtype=pixels.dtype) - (kernel_size - 1) / 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = pixels.shape[1]
    pad = kernel_size // 2
    out = F.conv2d(F.pad(pixels, (pad, pad, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(F.pad(out, (0, 0, pad, pad), mode="reflect"), kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)

