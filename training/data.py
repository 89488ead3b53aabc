"""Image-caption data: JSONL/CSV manifests, image folders with .txt captions, WebDataset shards.

Every sample is the image with its shortest side resized to the training resolution and
center-cropped (``pixels`` in [-1, 1] for the VAE), the same crop prepared for CLIP
(``clip_pixels``, 224 px, OpenAI mean/std) and its caption. Bad rows are skipped and
counted (by reason), never fatal; only a source with nothing usable is an error.

Order is deterministic: indexed sources walk a seeded permutation per epoch by global
position (step * global batch + rank * batch + i), so one process with batch 2B sees
the same samples as two with batch B, and ``--resume`` continues at the same position.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ipadapter.preprocess import preprocess

from .errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_COLUMNS = ("image", "image_path", "file_name", "filename", "path", "file", "img")
CAPTION_COLUMNS = ("text", "caption", "prompt", "txt")
CLIP_SIZE = 224
MAX_CONSECUTIVE_BAD = 100
MANIFEST_PROBE = 1000  # image paths checked when a manifest is opened

log = logging.getLogger("training")


class DataError(UserError):
    """A data source that cannot be used at all; the message is one line."""


class BadSample(Exception):
    """One unusable sample; ``reason`` is what the skip counter records."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Pair:
    image: str
    caption: str


# --- images -------------------------------------------------------------------------


def open_image(source: str | bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
        return image.convert("RGB")
    except FileNotFoundError:
        raise BadSample("missing file") from None
    except Exception:  # PIL raises many types for truncated or non-image files
        raise BadSample("broken image") from None


def resize_and_crop(image: Image.Image, size: int, rng: random.Random | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Shortest side to ``size`` (bilinear, as the reference's transforms.Resize), then a ``size`` square: the center
    one, or with ``rng`` a random one (the authors' SDXL ``random crop``). Returns the crop and its (top, left)."""
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_width, new_height), Image.BILINEAR)
    if rng is None:
        top, left = (new_height - size) // 2, (new_width - size) // 2
    else:
        top, left = rng.randint(0, new_height - size), rng.randint(0, new_width - size)
    return image.crop((left, top, left + size, top + size)), (top, left)


def image_tensors(image: Image.Image, resolution: int, rng: random.Random | None = None) -> dict[str, torch.Tensor]:
    """The VAE input and the CLIP input of one image, and what SDXL's time ids record of it.

    CLIP sees the same crop (the crop of a shortest-side resize is the same region at any
    size), prepared by the core's ``preprocess``. ``original_size`` is the image's (height,
    width) before resizing and ``crop_top_left`` the crop's corner in the resized image, as the
    authors' SDXL script records them.
    """
    cropped, top_left = resize_and_crop(image, resolution, rng)
    crop = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0)
    pixels = crop.permute(2, 0, 1) * 2 - 1
    clip_pixels = preprocess(crop[None], size=CLIP_SIZE, mode="crop")[0]
    return {"pixels": pixels.contiguous(), "clip_pixels": clip_pixels.float().contiguous(),
            "original_size": torch.tensor([image.height, image.width]), "crop_top_left": torch.tensor(top_left)}


def crop_rng(random_crop: bool, *where) -> random.Random | None:
    """The random crop's generator for one sample at one place in the stream (seed, epoch, ...), or None (center)."""
    return random.Random("crop:" + ",".join(map(str, where))) if random_crop else None


# --- indexed sources: manifests and folders -----------------------------------------


def read_manifest(path: Path, image_column: str = "auto", caption_column: str = "auto") -> tuple[list[Pair], Counter]:
    """Rows of a .jsonl or .csv manifest; image paths are relative to the manifest's folder."""
    if not path.is_file():
        raise DataError(f"manifest '{path}' does not exist; expected a .jsonl or .csv file of image paths and captions")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"manifest '{path}' is not readable text ({type(error).__name__}); expected UTF-8 JSONL or CSV") from None
    skipped: Counter = Counter()
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        columns = list(rows[0].keys()) if rows else []
    else:
        rows = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                skipped["unreadable row"] += 1
        columns = sorted({key for row in rows for key in row})
    image_key = _pick_column(image_column, IMAGE_COLUMNS, columns, "image", path)
    caption_key = _pick_column(caption_column, CAPTION_COLUMNS, columns, "caption", path)
    pairs = []
    for row in rows:
        image, caption = row.get(image_key), row.get(caption_key)
        if not isinstance(image, str) or not image.strip():
            skipped["no image path"] += 1
        elif not isinstance(caption, str) or not caption.strip():
            skipped["empty caption"] += 1
        else:
            pairs.append(Pair(str(path.parent / image.strip()), caption.strip()))
    if not pairs:
        raise DataError(f"manifest '{path}' has no usable rows ({_describe(skipped) or 'it is empty'}); expected image paths and captions")
    # Files are checked when loaded (a missing one is skipped and counted); stat-ing millions
    # of paths up front would delay the start. A wrong base folder is still caught here.
    probe = pairs[:MANIFEST_PROBE]
    if not any(Path(pair.image).is_file() for pair in probe):
        raise DataError(
            f"manifest '{path}': none of the first {len(probe)} image files exist (first: '{probe[0].image}'); "
            "expected paths relative to the manifest's folder, or absolute"
        )
    return pairs, skipped


def _pick_column(wanted: str, candidates: tuple[str, ...], columns: list[str], what: str, path: Path) -> str:
    if wanted != "auto":
        if wanted not in columns:
            raise DataError(f"manifest '{path}' has no column '{wanted}' (found {columns[:6]}); expected the {what} column")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise DataError(f"manifest '{path}' has no {what} column (found {columns[:6]}); expected one of {', '.join(candidates)}")


def read_folder(path: Path) -> tuple[list[Pair], Counter]:
    """Images with a same-name ``.txt`` caption, in all subfolders, sorted by path."""
    skipped: Counter = Counter()
    pairs = []
    for image in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        caption_file = image.with_suffix(".txt")
        if not caption_file.is_file():
            skipped["missing caption"] += 1
            continue
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
        if not caption:
            skipped["empty caption"] += 1
            continue
        pairs.append(Pair(str(image), caption))
    if not pairs:
        raise DataError(
            f"folder '{path}' has no usable image+caption pairs ({_describe(skipped) or 'no images'}); "
            "expected images with same-name .txt captions"
        )
    return pairs, skipped


class IndexedPairs(Dataset):
    """Maps a global stream position to a sample of a seeded per-epoch permutation.

    An image that fails to load is replaced by the next pair in the permutation, so
    batches stay full and deterministic; the sample records what it skipped.
    """

    def __init__(self, pairs: list[Pair], resolution: int, seed: int, random_crop: bool = False):
        self.pairs = pairs
        self.resolution = resolution
        self.seed = seed
        self.random_crop = random_crop
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return len(self.pairs)

    def order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.pairs), generator=generator)
        return self._order

    def load(self, index: int, epoch: int = 0) -> dict:
        """The tensors of pair ``index`` (``training.cache.CachedPairs`` reads them from the cache)."""
        rng = crop_rng(self.random_crop, self.seed, epoch, index)
        return image_tensors(open_image(self.pairs[index].image), self.resolution, rng)

    def __getitem__(self, position: int) -> dict:
        epoch, offset = divmod(position, len(self.pairs))
        skipped = []
        for attempt in range(min(MAX_CONSECUTIVE_BAD, len(self.pairs))):
            index = int(self.order(epoch)[(offset + attempt) % len(self.pairs)])
            try:
                sample = self.load(index, epoch)
            except BadSample as bad:
                skipped.append(bad.reason)
                continue
            return {**sample, "caption": self.pairs[index].caption, "skipped": skipped}
        raise DataError(f"{len(skipped)} images in a row could not be read (last: {skipped[-1]}); check the data source")


class PositionBatches:
    """Infinite batches of global positions for one rank, starting at ``start_step``."""

    def __init__(self, batch_size: int, rank: int, world_size: int, start_step: int = 0):
        self.batch_size, self.rank, self.world_size, self.start_step = batch_size, rank, world_size, start_step

    def __iter__(self):
        step = self.start_step
        global_batch = self.batch_size * self.world_size
        while True:
            first = step * global_batch + self.rank * self.batch_size
            yield list(range(first, first + self.batch_size))
            step += 1


# --- streamed source: WebDataset tar shards (img2dataset layout) -------------------


def expand_shards(spec: str) -> list[Path]:
    """``a/{00000..00009}.tar``, a folder of .tar files, a single .tar, or several specs joined by '::'."""
    paths: list[Path] = []
    for part in spec.split("::"):
        for item in brace_expand(part.strip()):
            item_path = Path(item).expanduser()
            if item_path.is_dir():
                paths.extend(sorted(item_path.glob("*.tar")))
            else:
                paths.append(item_path)
    missing = [p for p in paths if not p.is_file()]
    if not paths or len(missing) == len(paths):
        raise DataError(f"no WebDataset shards found for '{spec}'; expected .tar files (e.g. 'data/{{00000..00099}}.tar')")
    if missing:
        log.warning("data: %d of %d shards do not exist and are left out (first: %s)", len(missing), len(paths), missing[0])
    return [p for p in paths if p.is_file()]


def brace_expand(pattern: str) -> list[str]:
    """Shell-style braces as in WebDataset URLs: ``{000..009}`` (zero-padded ranges) and ``{a,b}``."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in brace_expand(head + choice + tail)]


def tar_samples(path: Path):
    """(key, {extension: bytes}) groups of a tar, in file order; a damaged tar ends early with 'unreadable shard'."""
    current_key, files = None, {}
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                directory, _, name = member.name.rpartition("/")
                stem, dot, extension = name.partition(".")
                key = f"{directory}/{stem}" if directory else stem
                if key != current_key and current_key is not None:
                    yield current_key, files
                    files = {}
                current_key = key
                handle = archive.extractfile(member)
                files[extension.lower()] = handle.read() if handle else b""
    except (tarfile.TarError, OSError, EOFError):
        if files:
            yield current_key, files
        yield None, {"__error__": b"unreadable shard"}
        return
    if current_key is not None:
        yield current_key, files


def decode_webdataset_sample(files: dict[str, bytes], resolution: int, rng: random.Random | None = None) -> dict:
    if "__error__" in files:
        raise BadSample(files["__error__"].decode())
    image_bytes = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
    if image_bytes is None:
        raise BadSample("no image in sample")
    caption = files.get("txt", b"").decode("utf-8", errors="replace").strip()
    if not caption and "json" in files:
        try:
            caption = str(json.loads(files["json"]).get("caption") or "").strip()
        except (ValueError, AttributeError):
            pass
    if not caption:
        raise BadSample("empty caption")
    return {**image_tensors(open_image(image_bytes), resolution, rng), "caption": caption}


class ShardStream(IterableDataset):
    """Shards split by (rank, worker) without overlap, looped forever in a seeded order per epoch.

    Each sample carries its worker's stream position (epoch, shard, sample) so a resumed
    run restarts every worker where the last consumed batch left it. Workers are
    renumbered by ``start_batches`` so the DataLoader's round robin continues in order.
    """

    def __init__(self, shards: list[Path], resolution: int, seed: int, rank: int, world_size: int, start: dict | None = None,
                 random_crop: bool = False):
        self.shards, self.resolution, self.seed, self.random_crop = shards, resolution, seed, random_crop
        self.rank, self.world_size = rank, world_size
        self.start = start or {"batches": 0, "workers": {}}
        self.worker_override: tuple[int, int] | None = None  # (id, count), for tests without a DataLoader

    def groups(self, shard: Path):
        """The samples of one shard in file order, undecoded (``training.cache`` reads cached ones)."""
        return (files for _, files in tar_samples(shard))

    def decode(self, files, where: tuple = ()) -> dict:
        return decode_webdataset_sample(files, self.resolution, crop_rng(self.random_crop, self.seed, *where))

    def shards_of(self, worker: int, num_workers: int) -> list[Path]:
        return self.shards[self.rank * num_workers + worker :: self.world_size * num_workers]

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = self.worker_override or ((info.id, info.num_workers) if info else (0, 1))
        logical = (worker + self.start["batches"]) % num_workers
        mine = self.shards_of(logical, num_workers)
        if not mine:
            raise DataError(
                f"{len(self.shards)} shards cannot be split over {self.world_size} ranks x {num_workers} workers; "
                "expected at least one shard per worker (use fewer data.num_workers or more shards)"
            )
        epoch, shard_index, sample_index = self.start["workers"].get(str(logical), (0, 0, 0))
        pending: list[str] = []  # reasons of skipped samples, reported with the next good one
        good_this_pass = False
        while True:
            order = list(range(len(mine)))
            random.Random(hash((self.seed, epoch, self.rank, logical))).shuffle(order)
            for index in range(shard_index, len(order)):
                for position, group in enumerate(self.groups(mine[order[index]])):
                    if position < sample_index:
                        continue
                    try:
                        sample = self.decode(group, (epoch, mine[order[index]].name, position))
                    except BadSample as bad:
                        pending.append(bad.reason)
                        continue
                    good_this_pass = True
                    yield {**sample, "skipped": pending, "position": {str(logical): (epoch, index, position + 1)}}
                    pending = []
                sample_index = 0
            if not good_this_pass and shard_index == 0:
                raise DataError(
                    f"shards {mine[0].name}... of rank {self.rank} worker {logical} hold no usable sample "
                    f"({', '.join(sorted(set(pending)))}); expected images with .txt captions"
                )
            epoch, shard_index, good_this_pass = epoch + 1, 0, False


# --- batches -----------------------------------------------------------------------


TENSOR_FIELDS = ("pixels", "clip_pixels", "moments", "image_embeds", "penultimate", "text_embeds", "pooled_text",
                 "input_ids", "original_size", "crop_top_left")


def collate(samples: list[dict]) -> dict:
    """Stack the samples; skipped reasons and stream positions ride along."""
    skipped = Counter(reason for s in samples for reason in s["skipped"])
    positions = {}
    for sample in samples:
        positions.update(sample.get("position", {}))
    # images (online encoding), or the frozen encoders' cached outputs (training.cache)
    tensors = {key: torch.stack([s[key] for s in samples]) for key in TENSOR_FIELDS if key in samples[0]}
    return {
        **tensors,
        "captions": [s["caption"] for s in samples],
        "skipped": skipped,
        "positions": positions,
    }


@dataclass
class DataSource:
    kind: str  # "manifest" | "folder" | "webdataset"
    description: str
    pairs: list[Pair] | None = None
    shards: list[Path] | None = None
    scan_skipped: Counter | None = None


def open_source(path: str | None, kind: str = "auto", image_column: str = "auto", caption_column: str = "auto") -> DataSource:
    """Read and check a data source before training starts (manifests and folders are scanned now)."""
    if not path:
        raise DataError("data.path is not set; expected a .jsonl/.csv manifest, an image folder or WebDataset .tar shards")
    location = Path(path).expanduser()
    if kind == "auto":
        if location.is_dir():
            kind = "webdataset" if any(location.glob("*.tar")) and not any(
                p.suffix.lower() in IMAGE_EXTENSIONS for p in location.iterdir()
            ) else "folder"
        elif location.suffix.lower() in (".jsonl", ".json", ".csv"):
            kind = "manifest"
        elif ".tar" in str(path) or "{" in str(path):
            kind = "webdataset"
        else:
            raise DataError(f"data.path '{path}' does not exist or has an unknown type; expected a .jsonl/.csv manifest, a folder or .tar shards")
    if kind == "manifest":
        pairs, skipped = read_manifest(location, image_column, caption_column)
        return DataSource(kind, f"{len(pairs)} pairs from {location.name}", pairs=pairs, scan_skipped=skipped)
    if kind == "folder":
        if not location.is_dir():
            raise DataError(f"image folder '{path}' does not exist; expected a folder of images with .txt captions")
        pairs, skipped = read_folder(location)
        return DataSource(kind, f"{len(pairs)} pairs in {location}", pairs=pairs, scan_skipped=skipped)
    shards = expand_shards(str(path))
    return DataSource("webdataset", f"{len(shards)} WebDataset shards", shards=shards, scan_skipped=Counter())


def make_loader(
    source: DataSource,
    resolution: int,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int,
    position: dict | None = None,
    cache=None,
    random_crop: bool = False,
) -> DataLoader:
    """An endless loader for this rank, continuing at ``position`` (from ``DataPosition.state``).

    With a ``training.cache.FeatureCache`` the samples are the frozen encoders' cached
    outputs instead of images, in the same order, with the same skips and positions.
    """
    position = position or {}
    common = dict(num_workers=num_workers, collate_fn=collate, persistent_workers=False)
    if num_workers:
        common["prefetch_factor"] = 2
    if source.pairs is not None:
        dataset = cache.pairs_dataset(source.pairs, seed) if cache is not None else IndexedPairs(source.pairs, resolution, seed, random_crop)
        batches = PositionBatches(batch_size, rank, world_size, position.get("step", 0))
        return DataLoader(dataset, batch_sampler=batches, **common)
    readers = world_size * max(num_workers, 1)
    if len(source.shards) < readers:
        raise DataError(
            f"{len(source.shards)} shards cannot be split over {world_size} ranks x {max(num_workers, 1)} workers; "
            "expected at least one shard per worker (use fewer data.num_workers or more shards)"
        )
    stream_start = position.get("stream")
    if stream_start and stream_start.get("num_workers") != max(num_workers, 1):
        log.warning("data: the stream position was saved with %s workers, now %s; shards restart from the beginning",
                    stream_start.get("num_workers"), max(num_workers, 1))
        stream_start = None
    stream_class = cache.shard_stream_class() if cache is not None else ShardStream
    stream = stream_class(source.shards, resolution, seed, rank, world_size, stream_start, random_crop=random_crop)
    return DataLoader(stream, batch_size=batch_size, **common)


class DataPosition:
    """Where this rank's data stands after the batches consumed so far; saved with the training state."""

    def __init__(self, num_workers: int, start: dict | None = None):
        start = start or {}
        stream = start.get("stream") or {}
        self.num_workers = max(num_workers, 1)
        self.step = start.get("step", 0)
        self.batches = stream.get("batches", 0)
        self.workers = dict(stream.get("workers", {}))
        self.skipped: Counter = Counter(start.get("skipped", {}))

    def consumed(self, batch: dict) -> None:
        self.step += 1
        self.batches += 1
        self.workers.update(batch["positions"])
        self.skipped.update(batch["skipped"])

    def state(self) -> dict:
        return {
            "step": self.step,
            "stream": {"batches": self.batches, "workers": self.workers, "num_workers": self.num_workers},
            "skipped": dict(self.skipped),
        }


def describe_skips(skipped: Counter) -> str:
    return _describe(skipped)


def _describe(skipped: Counter) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in skipped.most_common())


# --- the embedded default's toy data -----------------------------------------------

TOY_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40), "white": (240, 240, 240), "black": (20, 20, 20)}
TOY_SHAPES = ("circle", "square", "triangle")


def write_toy_dataset(folder: str | Path, count: int = 64, seed: int = 0) -> Path:
    """Colored shapes on plain backgrounds with matching captions, as an image folder (idempotent)."""
    folder = Path(folder)
    if folder.is_dir() and len(list(folder.glob("*.txt"))) >= count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(TOY_COLORS)
    for index in range(count):
        shape, color = rng.choice(TOY_SHAPES), rng.choice(names)
        background = rng.choice([n for n in names if n != color])
        width, height = rng.choice([(96, 80), (80, 96), (88, 88)])
        image = Image.new("RGB", (width, height), TOY_COLORS[background])
        draw = ImageDraw.Draw(image)
        size = rng.randint(24, 40)
        x, y = rng.randint(size, width - size), rng.randint(size, height - size)
        box = (x - size, y - size, x + size, y + size)
        if shape == "circle":
            draw.ellipse(box, fill=TOY_COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=TOY_COLORS[color])
        else:
            draw.polygon([(x, y - size), (x - size, y + size), (x + size, y + size)], fill=TOY_COLORS[color])
        image.save(folder / f"{index:04d}.png")
        (folder / f"{index:04d}.txt").write_text(f"a {color} {shape} on a {background} background")
    return folder
