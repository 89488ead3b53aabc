"""CLIP image preprocessing in torch, as the reference's CLIPImageProcessor does it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .choices import CROP_MODES

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def as_channels_first(images: torch.Tensor) -> torch.Tensor:
    """Float images in 0..1 -> [B, 3, H, W] float32.

    ComfyUI's IMAGE layout [B, H, W, 3] is the default: a tensor whose last
    dimension is 3 is always read that way. [B, 3, H, W] is accepted when the last
    dimension is not 3.
    """
    if images.dim() != 4 or 3 not in (images.shape[1], images.shape[-1]):
        raise ValueError(f"images have shape {list(images.shape)}; expected [batch, height, width, 3] in 0..1")
    if images.shape[0] == 0:
        raise ValueError("the image batch is empty; expected at least one image")
    if not images.is_floating_point():
        raise ValueError(f"images are {images.dtype}; expected floats in 0..1 (divide 8-bit pixels by 255)")
    if images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    return images.float()


def _resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    resized = F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp(0, 1)  # bicubic overshoots; PIL clips to the pixel range as well


def preprocess(images: torch.Tensor, size: int = 224, mode: str = "crop", mean: tuple[float, ...] = CLIP_MEAN,
               std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """Images in 0..1 -> normalised [B, 3, size, size] pixels for the CLIP encoder (another encoder's ``mean``/``std``).

    - ``crop``: shortest side to ``size`` (bicubic, antialiased; the long side
      floored as transformers does), center crop: the reference's CLIPImageProcessor;
    - ``pad``: longest side to ``size``, padded to a square with the CLIP mean colour
      (zero after normalisation), so nothing is cut off;
    - ``stretch``: straight to ``size``×``size``.
    """
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode '{mode}' is unknown; expected one of {', '.join(CROP_MODES)}")
    images = as_channels_first(images)
    height, width = images.shape[-2:]
    if mode == "stretch":
        images = _resize(images, size, size)
    elif mode == "crop":
        short = min(height, width)
        new_h, new_w = size * height // short, size * width // short
        images = _resize(images, new_h, new_w)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        images = images[..., top : top + size, left : left + size]
    else:
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        images = _resize(images, new_h, new_w)
        canvas = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        canvas = canvas.repeat(images.shape[0], 1, size, size)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        canvas[..., top : top + new_h, left : left + new_w] = images
        images = canvas
    channel_mean = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    channel_std = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - channel_mean) / channel_std
