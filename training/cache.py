"""``python -m training.cache [same options as training.run]``: the frozen encoders' outputs, computed once.

The paper's recipe has no random augmentation, so what the frozen encoders make of a
sample never changes between epochs. This pass writes, for every sample of the data
source (manifest, image folder or WebDataset shards):

- ``moments``: the VAE posterior's parameters (mean and log-variance, [8, h, w]); the
  latent ``mean + std * noise`` is still sampled at train time from the run's per-sample
  draws, exactly as the online path does;
- ``image_embeds``: the ViT-H/14 image embedding ([1024]); a dropped image is still
  zeroed at train time; or, for the plus / full-face variants, ``penultimate``: the
  encoder's second-to-last hidden states ([257, 1280]); a dropped image takes the states
  of an all-zero CLIP input, stored once;
- ``text_embeds``: the text encoder's output ([77, 768]), or with ``cache.text ids`` only
  the token ids ([77]); the empty prompt of a dropped caption is stored once.

The DiT families (Flux.1, SD3.5) store the same kinds of outputs from their own encoders: the VAE's
``moments``, the variant's image features (taken from the training image itself; the encoder resizes it), and
``text_embeds`` + ``pooled_text`` as their pipelines join them (T5 and CLIP); once, the empty prompt's and the
dropped image's features (``dropped_image``). The pass loads no transformer, a run from the cache no encoder.

Shards go next to the data (``<manifest>.cache/``, ``<folder>.cache/``,
``<shard folder>/ipadapter-cache/``, or ``cache.dir``), in a subfolder named by a
fingerprint of everything that changes the outputs: resolution, frozen dtype, the
model files (read in samples, so a run picks its cache before loading any model, and then
loads only what it runs), what is stored (which image features: the variant's input; text
outputs or ids), and the list of samples. A run whose
settings differ does not see the cache (``cache.use auto`` says why in one line and
encodes online; ``require`` stops). Shards are written under a temporary name and
renamed, so a killed pass resumes where it stopped: complete shards are skipped. Under
torchrun / deepspeed (``RANK``, ``WORLD_SIZE``) every rank writes its own shards
(``k % WORLD_SIZE == RANK``); no process group is needed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from ipadapter.encoder import CONFIG_OF_WEIGHTS
from ipadapter.files import atomic_path, write_text_atomic
from ipadapter.registry import variant_by_name

from .cli import local_device, open_data, open_models, run_cli, setup_logging
from .config import Config, load_config
from .data import (
    CLIP_SIZE,
    BadSample,
    DataSource,
    IndexedPairs,
    ShardStream,
    decode_webdataset_sample,
    image_tensors,
    open_image,
    tar_samples,
)
from .errors import UserError
from .models import FrozenModels

log = logging.getLogger("training")

FORMAT_VERSION = 3  # 3: models identified by their files
INFO_FILE = "cache.json"
EMPTY_FILE = "empty-prompt.safetensors"  # also holds the zero image's hidden states (plus, full-face)
ZERO_IMAGE = "zero_image_penultimate"
DROPPED_IMAGE = "dropped_image"  # the DiT families: the image features a dropped image gets, stored once


RANDOM_CROP = "data.crop is random, and a cache holds one crop per image; random crops are encoded every step"


class CacheError(UserError):
    """A cache that cannot be used by this run; the message is one line."""


# --- identity ------------------------------------------------------------------------


SAMPLED_CHUNKS, CHUNK = 16, 1 << 16


def file_digest(path: Path) -> str:
    """sha1 of a file's name, size, first and last MiB and 16 evenly spaced 64 KiB chunks.

    Reads about 3 MiB of a multi-GB checkpoint, no model is built; any other weights of the same
    architecture (a fine-tune, another seed) differ in nearly every chunk.
    """
    digest = hashlib.sha1(f"{path.name}:{path.stat().st_size}".encode())
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size <= 2 * (1 << 20) + SAMPLED_CHUNKS * CHUNK:
            digest.update(handle.read())
            return digest.hexdigest()
        offsets = [0, size - (1 << 20)] + [size * i // (SAMPLED_CHUNKS + 1) for i in range(1, SAMPLED_CHUNKS + 1)]
        for offset in offsets:
            handle.seek(offset)
            digest.update(handle.read(1 << 20 if offset in offsets[:2] else CHUNK))
    return digest.hexdigest()


def model_digests(config: Config) -> dict[str, str]:
    """What the frozen encoders are, from the files alone (so a run can pick its cache before loading anything):
    the base model's folder except ``unet/`` or ``transformer/`` (its VAE, text encoders, tokenizers) or its single file, and the image
    encoder's file with a library config saved beside it (the head count and activation can come from there).
    The embedded run's models are fixed by the family and ``train.seed``."""
    if config.embedded:
        return {"embedded": f"{config.family.id}, seed {config.train.seed}"}
    base = Path(config.base_model).expanduser()
    denoiser = config.family.training.denoiser_folder
    files = sorted(p for p in base.rglob("*") if p.is_file() and p.relative_to(base).parts[0] != denoiser) \
        if base.is_dir() else [base]
    encoder = Path(config.model.image_encoder).expanduser()
    beside = encoder.with_name(CONFIG_OF_WEIGHTS[encoder.name]) if encoder.name in CONFIG_OF_WEIGHTS else encoder
    missing = [p for p in (base, encoder) if not p.exists()]
    if missing:
        return {"missing": str(missing[0])}  # no cache can match; loading the models says what is wrong
    return {
        "base_model": hashlib.sha1("".join(f"{p.relative_to(base) if base.is_dir() else p.name}={file_digest(p)}\n"
                                           for p in files).encode()).hexdigest(),
        "image_encoder": file_digest(encoder) + (f" + {file_digest(beside)}" if beside.is_file() and beside != encoder else ""),
    }


def data_digest(source: DataSource, base: Path) -> str:
    digest = hashlib.sha1()
    if source.pairs is not None:
        for pair in source.pairs:
            digest.update(f"{os.path.relpath(pair.image, base)}\t{pair.caption}\n".encode())
    else:
        for shard in source.shards:
            digest.update(f"{shard.name}\t{shard.stat().st_size}\n".encode())
    return digest.hexdigest()


def data_base(config: Config, source: DataSource) -> Path:
    location = Path(config.data.path).expanduser()
    if source.kind == "webdataset":
        return source.shards[0].parent
    return location.parent if location.is_file() else location


def default_root(config: Config, source: DataSource) -> Path:
    if config.cache.dir:
        return Path(config.cache.dir).expanduser()
    if source.kind == "webdataset":
        return source.shards[0].parent / "ipadapter-cache"
    location = Path(config.data.path).expanduser()
    return location.with_name(location.name + ".cache")


def fingerprint(config: Config, source: DataSource, dtype: torch.dtype) -> dict:
    """Everything that changes what the encoders give for the data; equal fingerprints, same cache. Computed from
    the config and the files, without loading a model."""
    features = {} if image_key(config) == "image_embeds" else {"image_features": image_key(config)}  # base: as before
    return {
        **features,
        "family": config.family.id,
        "version": FORMAT_VERSION,
        "resolution": config.data.resolution,
        "clip_size": CLIP_SIZE,
        "dtype": str(dtype).replace("torch.", ""),
        "text": config.cache.text,
        "models": model_digests(config),
        "data": {"kind": source.kind, "digest": data_digest(source, data_base(config, source)),
                 "shard_size": config.cache.shard_size if source.pairs is not None else None},
    }


def image_key(config: Config) -> str:
    """The image features the variant trains on, stored under this name: ``image_embeds`` or ``penultimate``."""
    return variant_by_name(config.model.variant, config.family).encoder_input


def key_of(identity: dict) -> str:
    return f"{identity['resolution']}px-{identity['dtype']}-" + hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def describe_difference(wanted: dict, found: dict) -> str:
    differences = []
    for field in ("resolution", "dtype", "text", "clip_size", "version"):
        if wanted.get(field) != found.get(field):
            differences.append(f"{field} {found.get(field)} (this run: {wanted.get(field)})")
    wanted_features, found_features = (identity.get("image_features", "image_embeds") for identity in (wanted, found))
    if wanted_features != found_features:
        differences.append(f"image features {found_features} (this run: {wanted_features}, model.variant)")
    for name, digest in wanted["models"].items():
        if found.get("models", {}).get(name) != digest:
            differences.append(f"other {name.replace('_', ' ')} files" if name != "embedded" else "other embedded models")
    if wanted["data"] != found.get("data"):
        differences.append("other samples or shard size")
    return ", ".join(differences) or "unknown"


# --- units: what one cache shard holds ---------------------------------------------------


def units_of(source: DataSource, shard_size: int) -> list[tuple[str, object]]:
    """(description, members): a slice of pairs per ``shard_size`` rows, or one tar."""
    if source.pairs is not None:
        return [(f"pairs {start}..{min(start + shard_size, len(source.pairs)) - 1}", range(start, min(start + shard_size, len(source.pairs))))
                for start in range(0, len(source.pairs), shard_size)]
    return [(shard.name, shard) for shard in source.shards]


def unit_file(folder: Path, unit: int) -> Path:
    return folder / f"shard-{unit:06d}.safetensors"


def _save_shard(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    with atomic_path(path) as temporary:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)


# --- reading at train time -----------------------------------------------------------------


class FeatureCache:
    """A complete cache that matches the run: per-sample encoder outputs by (shard, row)."""

    def __init__(self, folder: Path, identity: dict, source: DataSource, resolution: int):
        self.folder, self.identity, self.resolution = folder, identity, resolution
        self.shard_size = identity["data"]["shard_size"]
        self.text = identity["text"]
        self.image_key = identity.get("image_features", "image_embeds")
        self.unit_by_shard = {str(shard): index for index, shard in enumerate(source.shards or [])}
        written = json.loads((folder / INFO_FILE).read_text()).get("image_encoder", {})  # what the pass recorded
        self.image_embed_dim, self.image_hidden_width = written.get("embed_dim"), written.get("hidden_width")
        empty = _load_tensors(folder / EMPTY_FILE)
        self.empty_text = empty["text_embeds"] if self.text == "embeds" else None
        self.empty_pooled = empty.get("pooled_text") if self.text == "embeds" else None
        self.zero_image = empty.get(ZERO_IMAGE)
        self.dropped_image = empty.get(DROPPED_IMAGE)
        self._handles: dict[int, tuple] = {}

    def __getstate__(self):  # DataLoader workers open their own file handles
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _open(self, unit: int):
        if unit not in self._handles:
            if len(self._handles) >= 64:
                self._handles.pop(next(iter(self._handles)))
            handle = safe_open(str(unit_file(self.folder, unit)), "pt")
            metadata = handle.metadata() or {}
            self._handles[unit] = (handle, json.loads(metadata.get("reasons", "[]")), json.loads(metadata.get("captions", "[]")))
        return self._handles[unit]

    def count(self, unit: int) -> int:
        return len(self._open(unit)[1])

    def entry(self, unit: int, row: int) -> dict:
        """The cached tensors of one sample; a sample the pass could not read raises ``BadSample``."""
        handle, reasons, captions = self._open(unit)
        if reasons[row]:
            raise BadSample(reasons[row])
        sample = {name: handle.get_slice(name)[row : row + 1][0] for name in handle.keys()}
        if captions:
            sample["caption"] = captions[row]
        return sample

    def pairs_dataset(self, pairs, seed: int) -> "CachedPairs":
        return CachedPairs(pairs, self, seed)

    def shard_stream_class(self):
        return functools.partial(CachedShardStream, cache=self)


class CachedPairs(IndexedPairs):
    """``IndexedPairs`` with the same order, the same replacement of unreadable samples, from the cache."""

    def __init__(self, pairs, cache: FeatureCache, seed: int):
        super().__init__(pairs, cache.resolution, seed)
        self.cache = cache

    def load(self, index: int, epoch: int = 0) -> dict:
        unit, row = divmod(index, self.cache.shard_size)
        sample = self.cache.entry(unit, row)
        sample.pop("caption", None)
        return sample


class CachedShardStream(ShardStream):
    """``ShardStream`` over the cached shards: same split, order, skips and stream positions as the tars."""

    def __init__(self, *args, cache: FeatureCache, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache = cache

    def groups(self, shard: Path):
        unit = self.cache.unit_by_shard[str(shard)]
        return ((unit, row) for row in range(self.cache.count(unit)))

    def decode(self, group, where: tuple = ()) -> dict:
        return self.cache.entry(*group)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def open_cache(config: Config, source: DataSource, dtype: torch.dtype) -> FeatureCache | None:
    """The cache to train from, or None (encode online) with the reason logged; ``cache.use require`` raises."""
    if config.cache.use == "off":
        return None
    if config.data.crop == "random":
        if config.cache.use == "require":
            raise CacheError(RANDOM_CROP + " (cache.use is require)")
        log.info("cache: encoding online: %s", RANDOM_CROP)
        return None
    root = default_root(config, source)
    identity = fingerprint(config, source, dtype)
    folder = root / key_of(identity)
    command = "python -m training.cache (with this run's options)"
    problem = None
    if not (folder / INFO_FILE).is_file():
        others = sorted(root.glob(f"*/{INFO_FILE}")) if root.is_dir() else []
        if others:
            found = json.loads(others[-1].read_text())
            problem = f"the cache in {others[-1].parent} was built for {describe_difference(identity, found)}; run {command}"
        else:
            problem = f"no cache in {root}; run {command} to encode the data once"
    else:
        units = units_of(source, config.cache.shard_size)
        missing = [unit for unit in range(len(units)) if not unit_file(folder, unit).is_file()]
        if missing or not (folder / EMPTY_FILE).is_file():
            problem = f"the cache in {folder} is incomplete ({len(units) - len(missing)} of {len(units)} shards); run {command} to finish it"
    if problem:
        if config.cache.use == "require":
            raise CacheError(problem + " (cache.use is require)")
        log.info("cache: encoding online: %s", problem)
        return None
    log.info("cache: training from %s (frozen encoders' outputs; image %s, text %s)", folder, image_key(config), config.cache.text)
    return FeatureCache(folder, identity, source, config.data.resolution)


# --- the pass -------------------------------------------------------------------------------


class _Decoded(Dataset):
    """Images of one unit decoded like the trainer does; a bad one becomes its skip reason."""

    def __init__(self, items: list, resolution: int, webdataset: bool):
        self.items, self.resolution, self.webdataset = items, resolution, webdataset

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        try:
            if self.webdataset:
                return decode_webdataset_sample(item, self.resolution)
            return {**image_tensors(open_image(item.image), self.resolution), "caption": item.caption}
        except BadSample as bad:
            return bad.reason


def _as_list(batch):
    return batch


class UNetEncoders:
    """What the cache pass asks of the frozen encoders, for the UNet families (SD1.5, SDXL): the outputs of a batch
    of decoded samples, and what is stored once (the empty prompt, the zero image's hidden states)."""

    def __init__(self, frozen: FrozenModels, config: Config, device: torch.device):
        self.frozen, self.config, self.device, self.dtype = frozen, config, device, frozen.dtype
        self.widths = {"embed_dim": frozen.image_encoder.embed_dim, "hidden_width": frozen.image_encoder.hidden_width}

    def encode(self, samples: list[dict]) -> dict:
        frozen, config, device = self.frozen, self.config, self.device
        pixels = torch.stack([s["pixels"] for s in samples]).to(device)
        clip_pixels = torch.stack([s["clip_pixels"] for s in samples]).to(device)
        input_ids = frozen.tokenize([s["caption"] for s in samples])
        encoded = {"moments": frozen.encode_moments(pixels).cpu(),
                   image_key(config): frozen.encode_images(clip_pixels, image_key(config)).cpu()}
        if config.cache.text == "embeds":
            context, pooled = frozen.encode_text(input_ids.to(device))
            encoded["text_embeds"] = context.cpu()
            if pooled is not None:
                encoded["pooled_text"] = pooled.cpu()
        else:
            encoded["input_ids"] = input_ids
        if frozen.family.training.time_ids:  # SDXL's time ids record the image's size and crop
            encoded.update({name: torch.stack([s[name] for s in samples]) for name in ("original_size", "crop_top_left")})
        return encoded

    def once(self) -> dict:
        frozen, device = self.frozen, self.device
        stored = {"input_ids": frozen.tokenize([""])[0]}
        if self.config.cache.text == "embeds":
            context, pooled = frozen.empty_text_embeds(device)
            stored.update({"text_embeds": context.cpu()} if pooled is None else
                          {"text_embeds": context.cpu(), "pooled_text": pooled.cpu()})
        if image_key(self.config) == "penultimate":
            stored[ZERO_IMAGE] = frozen.zero_image_features(device).cpu()
        return stored


def as_encoders(encoders, config: Config, device: torch.device):
    """The UNet families' frozen models are wrapped; the DiT families' encoders come ready (``training.dit``)."""
    return UNetEncoders(encoders, config, device) if isinstance(encoders, FrozenModels) else encoders


def encode_unit(encoders, config: Config, items: list, webdataset: bool, device: torch.device, progress=None) -> tuple[dict, dict]:
    """Tensors and metadata of one cache shard."""
    loader = DataLoader(_Decoded(items, config.data.resolution, webdataset), batch_size=config.cache.encode_batch,
                        num_workers=config.data.num_workers, collate_fn=_as_list)
    rows: list = []
    for batch in loader:
        good = [sample for sample in batch if isinstance(sample, dict)]
        if good:
            encoded = encoders.encode(good)
            outputs = iter(range(len(good)))
        for sample in batch:
            if isinstance(sample, dict):
                index = next(outputs)
                rows.append(("", sample["caption"], {name: value[index] for name, value in encoded.items()}))
            else:
                rows.append((sample, "", None))
        if progress is not None:
            progress.update(len(batch))
    template = next((tensors for _, _, tensors in rows if tensors is not None), None)
    if template is None:  # nothing readable in this unit: shapes from a black image
        blank = {**image_tensors(Image.new("RGB", (config.data.resolution,) * 2), config.data.resolution), "caption": ""}
        template = {name: value[0] for name, value in encoders.encode([blank]).items()}
    tensors = {name: torch.stack([t[name] if t is not None else torch.zeros_like(value) for _, _, t in rows]) if rows
               else value[None][:0] for name, value in template.items()}
    metadata = {"reasons": json.dumps([reason for reason, _, _ in rows]), "count": str(len(rows))}
    if webdataset:
        metadata["captions"] = json.dumps([caption for _, caption, _ in rows])
    return tensors, metadata


def build_cache(config: Config, source: DataSource, encoders, device: torch.device,
                rank: int = 0, world_size: int = 1, progress: bool = True) -> dict:
    """Write this rank's missing shards (``encoders``: a family's frozen encoders); returns {"folder", "written",
    "skipped", "complete"}."""
    encoders = as_encoders(encoders, config, device)
    identity = fingerprint(config, source, encoders.dtype)
    folder = default_root(config, source) / key_of(identity)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / INFO_FILE).is_file():  # with the encoder's widths: a run from the cache does not load it
        write_text_atomic(folder / INFO_FILE, json.dumps({**identity, "image_encoder": encoders.widths}, indent=1,
                                                         sort_keys=True))
    if not (folder / EMPTY_FILE).is_file():
        _save_shard(encoders.once(), folder / EMPTY_FILE)
    units = units_of(source, config.cache.shard_size)
    mine = [unit for unit in range(len(units)) if unit % world_size == rank]
    todo = [unit for unit in mine if not unit_file(folder, unit).is_file()]
    log.info("cache: %s: %d shards, %d for rank %d of %d, %d already written", folder, len(units), len(mine), rank,
             world_size, len(mine) - len(todo))
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        total = sum(len(units[unit][1]) for unit in todo) if source.pairs is not None else None
        bar = tqdm(total=total, unit="img", dynamic_ncols=True, desc=f"cache (rank {rank})")
    try:
        for unit in todo:
            description, members = units[unit]
            if source.pairs is not None:
                items, webdataset = [source.pairs[index] for index in members], False
            else:
                items, webdataset = [files for _, files in tar_samples(members)], True
            tensors, metadata = encode_unit(encoders, config, items, webdataset, device, bar)
            metadata["source"] = description
            _save_shard(tensors, unit_file(folder, unit), metadata)
    finally:
        if bar is not None:
            bar.close()
    complete = all(unit_file(folder, unit).is_file() for unit in range(len(units)))
    return {"folder": folder, "written": len(todo), "skipped": len(mine) - len(todo), "complete": complete}


def main(argv: list[str] | None = None) -> dict:
    """The cache pass with the trainer's options; returns ``build_cache``'s summary."""
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    config, flags = load_config(argv)
    if "help" in flags:
        print("usage: python -m training.cache [the options of python -m training.run]\n"
              "Writes the frozen encoders' outputs for data.path; cache.* options choose where and what.")
        return {}
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", flags.get("local_rank", "0")))
    device = local_device(local_rank)
    if config.data.crop == "random":
        raise CacheError(f"{RANDOM_CROP}; expected data.crop center for a cache")
    # no process group here: each rank writes the toy data. The pass never runs the UNet or transformer: not read.
    source = open_data(config)
    if config.family.training.prediction == "flow":
        from .dit import DiTEncoders

        encoders = DiTEncoders.open(config, device)
    else:
        frozen = open_models(config, device, skip=("unet",))
        encoders = UNetEncoders(frozen.to(device), config, device)
    summary = build_cache(config, source, encoders, device, rank, world_size, config.train.progress)
    state = "complete" if summary["complete"] else "not complete yet (other ranks still writing, or run again)"
    print(f"cache: {summary['folder']} ({summary['written']} shards written, {summary['skipped']} already there; {state})", flush=True)
    return summary


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
