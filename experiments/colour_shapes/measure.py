"""Classical classifiers for a decoded sample: colour = hue of the saturated pixels, shape = fill of the bounding box.

No learned parts, so they cannot share a bias with the models they judge. Their accuracy
on the dataset's own images after a VAE round trip is reported next to the results.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .data import COLOUR_NAMES, COLOURS, SHAPES, hue_of

HUES = np.array([hue_of(COLOURS[name]) for name in COLOUR_NAMES])
SATURATED = 0.35  # HSV saturation above which a pixel counts as foreground
MIN_PIXELS = 40
SQUARE_FILL, CIRCLE_FILL = 0.92, 0.68  # clean images: square 1.0, circle ~0.78, triangle ~0.5  # fewer foreground pixels: no shape drawn (counts as wrong for both)


def _hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb = image.astype(np.float64) / 255 if image.dtype == np.uint8 else image.astype(np.float64)
    high, low = rgb.max(-1), rgb.min(-1)
    spread = high - low
    saturation = np.where(high > 0, spread / np.maximum(high, 1e-9), 0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(spread, 1e-9)
    hue = np.where(high == r, ((g - b) / safe) % 6, np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    return hue, saturation, high


def foreground(image: np.ndarray) -> np.ndarray:
    _, saturation, value = _hsv(image)
    return (saturation > SATURATED) & (value > 0.25)


def classify_colour(image: np.ndarray) -> str | None:
    """Nearest of the six hues to the circular mean hue of the foreground; None when nothing is drawn."""
    hue, _, _ = _hsv(image)
    mask = foreground(image)
    if mask.sum() < MIN_PIXELS:
        return None
    angles = np.deg2rad(hue[mask])
    mean = np.rad2deg(np.arctan2(np.sin(angles).mean(), np.cos(angles).mean())) % 360
    distance = np.abs((HUES - mean + 180) % 360 - 180)
    return COLOUR_NAMES[int(distance.argmin())]


def classify_shape(image: np.ndarray) -> str | None:
    """Fill ratio of the foreground's bounding box: square ~1, circle ~pi/4, triangle ~1/2."""
    mask = foreground(image)
    if mask.sum() < MIN_PIXELS:
        return None
    labels, count = ndimage.label(mask)
    if count > 1:  # the largest blob; stray pixels elsewhere do not stretch the box
        sizes = ndimage.sum(mask, labels, range(1, count + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box
    if fill > SQUARE_FILL:
        return "square"
    if fill > CIRCLE_FILL:
        return "circle"
    return "triangle"


def accuracy(predicted: list, expected: list) -> float:
    return float(np.mean([p == e for p, e in zip(predicted, expected)])) if expected else float("nan")


CHANCE_COLOUR = 1 / len(COLOUR_NAMES)
CHANCE_SHAPE = 1 / len(SHAPES)
