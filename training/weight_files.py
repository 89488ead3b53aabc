"""Single-file checkpoints in the original (ldm) layout, read part by part without a second copy.

``open_checkpoint`` opens a ``.safetensors`` file lazily (``safe_open``) or a torch file memory-mapped
(``weights_only``); ``take(prefix, dtype)`` reads one part's tensors, cast one at a time. ``materialise``
builds a model on the ``meta`` device and makes the file's tensors its parameters
(``load_state_dict(assign=True)``): no random initialisation, no copy. So loading peaks at the
models plus one tensor, for SD1.5 and SDXL alike.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from ipadapter.files import first_line

from .errors import ModelFileError

# Tensors the original files carry that the transformers models do not have (buffers, CLIP's logit scale).
IGNORED_SUFFIXES = ("position_ids", "logit_scale", "attn_mask")

log = logging.getLogger("training")


class LazyWeights:
    """A weights file's keys; its tensors are read only when taken, and cast to ``dtype`` one at a time."""

    def __init__(self, path: Path, keys: list[str], get: Callable[[str], torch.Tensor]):
        self.path, self.keys, self._get = path, keys, get

    def take(self, prefix: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The tensors whose keys start with ``prefix`` (keys unchanged); floating ones cast to ``dtype``."""
        tensors = {}
        for key in [k for k in self.keys if k.startswith(prefix)]:
            try:
                tensor = self._get(key)
            except Exception as reason:  # noqa: BLE001 -- safetensors and torch raise their own types
                raise ModelFileError(f"'{self.path.name}': tensor {key} could not be read ({first_line(reason)}); "
                             "the file may be truncated or corrupt, expected a complete checkpoint") from None
            tensors[key] = cast(tensor, dtype)
        return tensors


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


@contextlib.contextmanager
def open_checkpoint(path: Path) -> Iterator[LazyWeights]:
    """A .safetensors file through ``safe_open``; anything else through ``torch.load(mmap=True, weights_only=True)``
    (a ``state_dict`` inside is unwrapped). Tensors of a torch file are dropped from its dict as they are taken."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise ModelFileError(f"checkpoint '{path}' {where}; expected a single-file .safetensors or .ckpt")
    if path.suffix == ".safetensors":
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            keys = list(handle.keys())
        except (SafetensorError, OSError, ValueError) as reason:
            raise ModelFileError(f"'{path.name}' is not a readable .safetensors file ({first_line(reason)}); "
                         "the file may be truncated or corrupt, expected a complete safetensors file") from None
        try:
            yield LazyWeights(path, keys, handle.get_tensor)
        finally:
            del handle  # unmaps the file
        return
    loaded = torch_load(path)
    if isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    yield LazyWeights(path, [k for k, v in loaded.items() if isinstance(v, torch.Tensor)], loaded.pop)


def torch_load(path: Path) -> dict:
    import pickle

    try:
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as reason:
            if "mmap" not in str(reason):
                raise
            # files written before torch 1.6's zip format cannot be memory-mapped
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as reason:
        raise ModelFileError(f"'{path.name}' was refused: its pickle asks to run code or build non-tensor objects "
                     f"({first_line(reason)}); expected a plain dict of tensors (or use a .safetensors file)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as reason:
        raise ModelFileError(f"'{path.name}' is not a readable torch file ({first_line(reason)}); "
                     "the file may be truncated or corrupt, expected a checkpoint saved with torch.save") from None
    if not isinstance(loaded, dict):
        raise ModelFileError(f"'{path.name}' holds a {type(loaded).__name__}; expected a dict of tensors")
    return loaded


# --- building models without a random copy -------------------------------------------


def materialise(build: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor], what: str, source: str,
                 expected: str) -> torch.nn.Module:
    """``build()`` on the meta device, its parameters then *being* ``state``'s tensors (no copy, no random init)."""
    with torch.device("meta"):
        model = build()
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as reason:  # size mismatches
        detail = next((line.strip() for line in str(reason).splitlines() if "size mismatch" in line), first_line(reason))
        raise ModelFileError(f"'{source}': the {what} weights do not fit ({detail[:200]}); expected {expected}") from None
    missing = sorted(k for k in result.missing_keys if not k.endswith(IGNORED_SUFFIXES))
    if missing:  # would stay meta tensors (no values at all)
        raise ModelFileError(f"'{source}': the {what} lacks {len(missing)} weights (e.g. {missing[0]}); expected {expected}")
    unexpected = [k for k in result.unexpected_keys if not k.endswith(IGNORED_SUFFIXES)]
    if unexpected:
        log.warning("'%s': %d %s weights unused (e.g. %s)", source, len(unexpected), what, unexpected[0])
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers, which no file carries
            if not name.endswith("position_ids"):
                raise ModelFileError(f"'{source}': the {what} has no value for its buffer {name}; expected {expected}")
            owner = model.get_submodule(name.rpartition(".")[0])
            owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape).clone(),
                                  persistent=False)
    return model.eval()


def config_dict(cls, folder: Path, what: str, source: str) -> dict:
    try:
        return dict(cls.load_config(str(folder), local_files_only=True))
    except (OSError, ValueError) as reason:
        raise ModelFileError(f"'{source}': {what} config could not be read ({first_line(reason)})") from None


def text_state(tensors: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Keys with or without ``text_model.`` as the model has them (transformers 5's CLIPTextModel has no prefix)."""
    prefix = "text_model."
    own = model.state_dict().keys()
    own_prefixed = any(k.startswith(prefix) for k in own)
    state = {}
    for key, value in tensors.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        bare = key[len(prefix):] if key.startswith(prefix) else key
        state[prefix + bare if own_prefixed and not bare.startswith("text_projection") else bare] = value
    return state


def convert(converter, part: dict, config: dict, what: str, source: str, family: str) -> dict:
    """``converter(part, config)`` (diffusers' ldm converters) with a one-line error naming ``family``'s part."""
    try:
        return converter(part, config)
    except (KeyError, IndexError, ValueError, RuntimeError) as reason:
        raise ModelFileError(f"'{source}': the {what} could not be converted from the original layout "
                             f"({type(reason).__name__}: {first_line(reason)}); expected {family}'s {what}") from None


def diffusers_part(weights: LazyWeights, cls, config_folder: Path, prefix: str, converter, what: str, family: str,
                   expected: str, dtype: torch.dtype) -> torch.nn.Module:
    """A UNet or VAE of a single file: its ``prefix`` tensors through diffusers' ldm ``converter``, built from the
    shipped config in ``config_folder``."""
    source = weights.path.name
    config = config_dict(cls, config_folder, f"the shipped {family} {what}", source)
    state = convert(converter, weights.take(prefix, dtype), config, what, source, family)
    return materialise(lambda: cls.from_config(config), state, what, source, expected)


def text_encoder_part(weights: LazyWeights, cls, config_file: Path, prefix: str, converter, what: str, expected: str,
                      dtype: torch.dtype) -> torch.nn.Module:
    """A transformers CLIP text model of a single file: ``converter(tensors, template)`` gives its state dict, the
    ``text_model.`` prefix as the installed transformers has it."""
    from transformers import CLIPTextConfig

    config = CLIPTextConfig.from_json_file(str(config_file))
    with torch.device("meta"):
        template = cls(config)
    state = text_state(converter(weights.take(prefix, dtype), template), template)
    return materialise(lambda: cls(config), state, what, weights.path.name, expected)


# --- diffusers / transformers model folders -------------------------------------------


DIFFUSERS_WEIGHT_STEMS = ("diffusion_pytorch_model", "diffusion_pytorch_model.fp16")


def _diffusers_weight_files(sub: Path) -> list[Path]:
    for stem in DIFFUSERS_WEIGHT_STEMS:
        if (sub / f"{stem}.safetensors").is_file():
            return [sub / f"{stem}.safetensors"]
        index = sub / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as reason:
                raise ModelFileError(f"'{index}' could not be read ({first_line(reason)}); expected a safetensors shard index") from None
            return [sub / shard for shard in shards]
        if (sub / f"{stem}.bin").is_file():
            return [sub / f"{stem}.bin"]
    return []


def load_folder_part(cls, folder: Path, name: str, dtype: torch.dtype, family: str):
    """``folder/name`` (a diffusers model, or a transformers one: the text encoders) in ``dtype``, every weight
    required (a missing one would train against random values); one-line errors naming ``family``."""
    if not issubclass(cls, (AutoencoderKL, UNet2DConditionModel)):
        return _load_transformers_part(cls, folder, name, dtype, family)
    source = f"{family} folder '{folder}'"
    try:
        config = dict(cls.load_config(str(folder), subfolder=name, local_files_only=True))
    except (OSError, ValueError) as reason:
        raise ModelFileError(f"{source}: {name}/ could not be read ({first_line(reason)})") from None
    files = _diffusers_weight_files(folder / name)
    if not files:
        raise ModelFileError(f"{source}: {name}/ has no weights; expected {DIFFUSERS_WEIGHT_STEMS[0]}.safetensors (or .bin)")
    state = {}
    for path in files:
        if not path.is_file():
            raise ModelFileError(f"{source}: {name}/ lacks the shard {path.name} its index names; expected every shard")
        with open_checkpoint(path) as weights:
            state.update(weights.take("", dtype))
    try:
        return materialise(lambda: cls.from_config(config), state, f"{name}/", str(folder), f"complete {family} weights in {name}/")
    except (TypeError, ValueError) as reason:  # a config the class cannot build
        raise ModelFileError(f"{source}: {name}/ could not be read ({first_line(reason)})") from None


def _load_transformers_part(cls, folder: Path, name: str, dtype: torch.dtype, family: str):
    source = f"{family} folder '{folder}'"
    try:
        model, info = cls.from_pretrained(str(folder), subfolder=name, local_files_only=True, dtype=dtype,
                                          output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as reason:
        raise ModelFileError(f"{source}: {name}/ could not be read ({first_line(reason)})") from None
    missing = sorted(k for k in info.get("missing_keys", []) if not k.endswith(IGNORED_SUFFIXES))
    if missing:  # would silently train against randomly initialised weights
        raise ModelFileError(f"{source}: {name}/ lacks {len(missing)} weights (e.g. {missing[0]}); expected complete {family} weights")
    return model.eval()
