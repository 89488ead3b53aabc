"""The synthetic data: one coloured shape on a grey background; the caption names the shape, never the colour.

Six hues 60 degrees apart (chance 1/6 for colour) and three shapes (chance 1/3).
"""
from __future__ import annotations

import colorsys
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
BACKGROUND = (96, 96, 96)
COLOURS = {  # name -> RGB, hues 0, 60, ..., 300 degrees
    "red": (220, 40, 40), "yellow": (220, 220, 40), "green": (40, 220, 40),
    "cyan": (40, 220, 220), "blue": (40, 40, 220), "magenta": (220, 40, 220),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")


def caption(shape: str) -> str:
    return f"a {shape}"


def render(shape: str, colour: str, rng: random.Random | None = None, size: int = SIZE) -> Image.Image:
    """One image; ``rng`` jitters position and size (None: centred, medium size)."""
    scale = size / 64
    if rng is None:
        cx = cy = size / 2
        radius = 17 * scale
    else:
        radius = rng.uniform(15, 19) * scale
        cx = size / 2 + rng.uniform(-4, 4) * scale
        cy = size / 2 + rng.uniform(-4, 4) * scale
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "square":
        half = radius * 0.89  # same area as the circle
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        r = radius * 1.35
        draw.polygon([(cx, cy - r), (cx - r * 0.866, cy + r * 0.5), (cx + r * 0.866, cy + r * 0.5)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return image


def random_example(rng: random.Random) -> tuple[Image.Image, str, str, str]:
    shape, colour = rng.choice(SHAPES), rng.choice(COLOUR_NAMES)
    return render(shape, colour, rng), caption(shape), shape, colour


def write_dataset(folder: str | Path, count: int, seed: int = 0) -> Path:
    """``count`` images with same-name ``.txt`` captions (the trainer's folder format); idempotent."""
    folder = Path(folder)
    if folder.is_dir() and len(list(folder.glob("*.txt"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        image, text, _, _ = random_example(rng)
        image.save(folder / f"{index:05d}.png")
        (folder / f"{index:05d}.txt").write_text(text)
    return folder


def batch(rng: random.Random, count: int) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    """[count, 64, 64, 3] uint8 images, captions, shapes, colours."""
    images, captions, shapes, colours = [], [], [], []
    for _ in range(count):
        image, text, shape, colour = random_example(rng)
        images.append(np.asarray(image))
        captions.append(text)
        shapes.append(shape)
        colours.append(colour)
    return np.stack(images), captions, shapes, colours


def hue_of(rgb) -> float:
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360


def read_dataset(folder: str | Path) -> tuple[np.ndarray, list[str]]:
    """The images and captions that ``write_dataset`` wrote, in file order."""
    paths = sorted(Path(folder).glob("*.png"))
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return images, [p.with_suffix(".txt").read_text() for p in paths]
