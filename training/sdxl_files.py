"""SDXL base models from the user's files, offline: a diffusers folder or a single-file checkpoint.

``load_sdxl_folder`` reads a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``,
``text_encoder_2/``; ``tokenizer/``, ``tokenizer_2/`` and ``scheduler/`` optional).
``load_sdxl_single_file`` reads ``sd_xl_base_1.0.safetensors``-style files (or a ``.ckpt``)
in the original layout, with the SDXL base configs shipped in ``configs/sdxl/``:

* ``model.diffusion_model.*``: the UNet (diffusers' ldm converter);
* ``first_stage_model.*``: the VAE (diffusers' ldm converter; scaling factor 0.13025);
* ``conditioner.embedders.0.transformer.*``: CLIP ViT-L/14, transformers keys -> ``CLIPTextModel``;
* ``conditioner.embedders.1.model.*``: OpenCLIP ViT-bigG/14 in open_clip keys (fused ``in_proj``,
  ``text_projection`` applied as ``x @ P``) -> ``CLIPTextModelWithProjection`` (diffusers' open_clip converter).

``detect_base_model_family`` tells SD1.5 from SDXL by the keys or the folder layout alone.

Memory: no part exists twice. Each model is built on the ``meta`` device (no random
initialisation, no storage) and takes the file's tensors as its parameters
(``load_state_dict(assign=True)``); the single file is opened lazily (safetensors
``safe_open``, a ``.ckpt`` memory-mapped) and read one part at a time, each tensor cast to
``dtype`` as it is read, so the peak is the loaded models plus one tensor. Measured on the
full-size random SDXL file (6.9 GB fp16; 2 CPU cores, file in the page cache), process
memory over the 0.45 GiB of imports: ``dtype=torch.bfloat16`` peaks at 6.8 GiB anonymous
memory (the models are 6.46 GiB) and takes 25 s; ``torch.float16`` (the file's own dtype)
adds 0.3 GiB and takes 1.3-5.4 s, because safetensors hands out copy-on-write mapped pages
of the file, so the weights stay page cache until written. ``torch.float32`` (not measured
here) needs the fp32 models, 12.9 GiB, plus one tensor.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ipadapter.files import first_line

SDXL_CONFIG_DIR = Path(__file__).parent / "configs" / "sdxl"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
# The parts of an SDXL base single file, in the order they are loaded.
SINGLE_FILE_PARTS = (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX),
                     ("CLIP-L text encoder", CLIP_L_PREFIX), ("OpenCLIP bigG text encoder", CLIP_G_PREFIX))
FOLDER_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
CLIP_L_WIDTH, CLIP_G_WIDTH = 768, 1280
# Tensors the original files carry that the transformers models do not have (buffers, CLIP's logit scale).
IGNORED_SUFFIXES = ("position_ids", "logit_scale", "attn_mask")

log = logging.getLogger("training")


def _error(message: str) -> Exception:
    """``training.models.ModelFileError`` (imported here, not at the top: ``training.models`` may import this module)."""
    from .models import ModelFileError

    return ModelFileError(message)


@dataclass
class SDXLParts:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel  # CLIP ViT-L/14, 768 wide
    text_encoder_2: CLIPTextModelWithProjection  # OpenCLIP ViT-bigG/14, 1280 wide, projection_dim 1280
    tokenizer_dir: Path | None  # the folder's tokenizer/ (None: a single file, or a folder without one)
    tokenizer_2_dir: Path | None  # tokenizer_2/ (SDXL's pads with "!", id 0, where tokenizer/ pads with the end token)
    scheduler_dir: Path | None  # scheduler/ (None: use sdxl_scheduler()'s shipped DDPM config)


# --- which family --------------------------------------------------------------------


def detect_base_model_family(path: str | Path) -> str | None:
    """``"sdxl"``, ``"sd15"`` or None (unknown, unreadable, missing), from the file's keys or the folder's layout only.

    A folder: its ``unet/config.json`` cross-attention width (768 SD1.5, 2048 SDXL) when readable, otherwise
    ``text_encoder_2/`` (SDXL) or ``unet/`` with ``text_encoder/`` (SD1.5). A single file:
    ``conditioner.embedders.1.`` keys (SDXL base) or ``cond_stage_model.transformer.`` keys (SD1.5).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return _folder_family(path)[0]
    try:
        keys = _file_keys(path)
    except Exception:  # noqa: BLE001 -- any unreadable file is simply "unknown"; the loader reports why
        return None
    return _keys_family(keys)[0]


def _folder_family(folder: Path) -> tuple[str | None, str | None]:
    """(family id, what it looks like) of a diffusers folder."""
    try:
        width = json.loads((folder / "unet" / "config.json").read_text()).get("cross_attention_dim")
    except (OSError, ValueError, AttributeError):
        width = None
    if width is not None:
        return {768: ("sd15", "an SD1.5 model folder"), 2048: ("sdxl", "an SDXL base model folder"),
                1024: (None, "an SD2.x model folder"), 1280: (None, "an SDXL refiner model folder")}.get(
            width if isinstance(width, int) else -1, (None, None))
    if (folder / "text_encoder_2").is_dir():
        return "sdxl", "an SDXL base model folder"
    if (folder / "unet").is_dir() and (folder / "text_encoder").is_dir():
        return "sd15", "an SD1.5 model folder"
    return None, None


def _keys_family(keys) -> tuple[str | None, str | None]:
    """(family id, what it looks like) of a single file's keys."""
    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.1."):
        return "sdxl", "an SDXL base checkpoint"
    if has("conditioner.embedders.0.model."):
        return None, "an SDXL refiner checkpoint (OpenCLIP bigG only, no CLIP-L), not a base model"
    if has("cond_stage_model.transformer."):
        return "sd15", "an SD1.5 checkpoint; pass it as model.sd15"
    if has("cond_stage_model.model."):
        return None, "an SD2.x checkpoint (OpenCLIP ViT-H text encoder), which the trainer does not support"
    return None, None


def _file_keys(path: Path) -> list[str]:
    with _open_checkpoint(path) as weights:
        return list(weights.keys)


# --- reading files lazily ------------------------------------------------------------


class _LazyWeights:
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
                raise _error(f"'{self.path.name}': tensor {key} could not be read ({first_line(reason)}); "
                             "the file may be truncated or corrupt, expected a complete checkpoint") from None
            tensors[key] = _cast(tensor, dtype)
        return tensors


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


@contextlib.contextmanager
def _open_checkpoint(path: Path) -> Iterator[_LazyWeights]:
    """A .safetensors file through ``safe_open``; anything else through ``torch.load(mmap=True, weights_only=True)``
    (a ``state_dict`` inside is unwrapped). Tensors of a torch file are dropped from its dict as they are taken."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise _error(f"checkpoint '{path}' {where}; expected a single-file .safetensors or .ckpt")
    if path.suffix == ".safetensors":
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            keys = list(handle.keys())
        except (SafetensorError, OSError, ValueError) as reason:
            raise _error(f"'{path.name}' is not a readable .safetensors file ({first_line(reason)}); "
                         "the file may be truncated or corrupt, expected a complete safetensors file") from None
        try:
            yield _LazyWeights(path, keys, handle.get_tensor)
        finally:
            del handle  # unmaps the file
        return
    loaded = _torch_load(path)
    if isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    yield _LazyWeights(path, [k for k, v in loaded.items() if isinstance(v, torch.Tensor)], loaded.pop)


def _torch_load(path: Path) -> dict:
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
        raise _error(f"'{path.name}' was refused: its pickle asks to run code or build non-tensor objects "
                     f"({first_line(reason)}); expected a plain dict of tensors (or use a .safetensors file)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as reason:
        raise _error(f"'{path.name}' is not a readable torch file ({first_line(reason)}); "
                     "the file may be truncated or corrupt, expected a checkpoint saved with torch.save") from None
    if not isinstance(loaded, dict):
        raise _error(f"'{path.name}' holds a {type(loaded).__name__}; expected a dict of tensors")
    return loaded


# --- building models without a random copy -------------------------------------------


def _materialise(build: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor], what: str, source: str,
                 expected: str) -> torch.nn.Module:
    """``build()`` on the meta device, its parameters then *being* ``state``'s tensors (no copy, no random init)."""
    with torch.device("meta"):
        model = build()
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as reason:  # size mismatches
        detail = next((line.strip() for line in str(reason).splitlines() if "size mismatch" in line), first_line(reason))
        raise _error(f"'{source}': the {what} weights do not fit ({detail[:200]}); expected {expected}") from None
    missing = sorted(k for k in result.missing_keys if not k.endswith(IGNORED_SUFFIXES))
    if missing:  # would stay meta tensors (no values at all)
        raise _error(f"'{source}': the {what} lacks {len(missing)} weights (e.g. {missing[0]}); expected {expected}")
    unexpected = [k for k in result.unexpected_keys if not k.endswith(IGNORED_SUFFIXES)]
    if unexpected:
        log.warning("'%s': %d %s weights unused (e.g. %s)", source, len(unexpected), what, unexpected[0])
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers, which no file carries
            if not name.endswith("position_ids"):
                raise _error(f"'{source}': the {what} has no value for its buffer {name}; expected {expected}")
            owner = model.get_submodule(name.rpartition(".")[0])
            owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape).clone(),
                                  persistent=False)
    return model.eval()


def _config_dict(cls, folder: Path, what: str, source: str) -> dict:
    try:
        return dict(cls.load_config(str(folder), local_files_only=True))
    except (OSError, ValueError) as reason:
        raise _error(f"'{source}': {what} config could not be read ({first_line(reason)})") from None


def _text_state(tensors: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
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


# --- the single file -----------------------------------------------------------------


def load_sdxl_single_file(path: str | Path, dtype: torch.dtype = torch.float32, with_unet: bool = True) -> SDXLParts:
    """SDXL base from a single-file checkpoint in the original layout (see the module docstring), offline.

    Every part is built from the shipped configs in ``configs/sdxl/`` and holds the file's tensors cast
    to ``dtype`` (float32 by default, like the SD1.5 loader; float16/bfloat16 halve the memory). The
    tokenizer and scheduler fields are None: use the defaults (``sdxl_scheduler()``).
    """
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    path = Path(path).expanduser()
    name = path.name
    with _open_checkpoint(path) as weights:
        _check_sdxl_keys(weights.keys, name)
        expected = "the complete SDXL base weights of sd_xl_base_1.0's single-file layout"

        unet = None  # the cache pass never runs it
        if with_unet:
            unet_config = _config_dict(UNet2DConditionModel, SDXL_CONFIG_DIR / "unet", "the shipped SDXL UNet", name)
            part = weights.take(UNET_PREFIX, dtype)
            state = _convert(convert_ldm_unet_checkpoint, part, unet_config, "UNet", name)
            del part  # the converted dict holds the same tensors; nothing is copied
            unet = _materialise(lambda: UNet2DConditionModel.from_config(unet_config), state, "UNet", name, expected)
            del state

        vae_config = _config_dict(AutoencoderKL, SDXL_CONFIG_DIR / "vae", "the shipped SDXL VAE", name)
        part = weights.take(VAE_PREFIX, dtype)
        state = _convert(convert_ldm_vae_checkpoint, part, vae_config, "VAE", name)
        del part
        vae = _materialise(lambda: AutoencoderKL.from_config(vae_config), state, "VAE", name, expected)
        del state

        clip_l_config = CLIPTextConfig.from_json_file(str(SDXL_CONFIG_DIR / "text_encoder" / "config.json"))
        with torch.device("meta"):
            template = CLIPTextModel(clip_l_config)
        part = weights.take(CLIP_L_PREFIX, dtype)
        # strips the prefix: transformers keys (text_model.…) remain
        state = _text_state(convert_ldm_clip_checkpoint(part), template)
        del part
        text_encoder = _materialise(lambda: CLIPTextModel(clip_l_config), state, "CLIP-L text encoder", name, expected)
        del state

        clip_g_config = CLIPTextConfig.from_json_file(str(SDXL_CONFIG_DIR / "text_encoder_2" / "config.json"))
        with torch.device("meta"):
            template = CLIPTextModelWithProjection(clip_g_config)
        part = weights.take(CLIP_G_PREFIX, dtype)
        # splits each fused in_proj into q/k/v, renames the open_clip layers, transposes text_projection
        state = _text_state(convert_open_clip_checkpoint(template, part, prefix=CLIP_G_PREFIX), template)
        del part
        text_encoder_2 = _materialise(lambda: CLIPTextModelWithProjection(clip_g_config), state,
                                      "OpenCLIP bigG text encoder", name, expected)
        del state
    parts = SDXLParts(unet, vae, text_encoder, text_encoder_2, None, None, None)
    _check_consistent(parts, name)
    return parts


def _convert(converter, part: dict, config: dict, what: str, source: str) -> dict:
    try:
        return converter(part, config)
    except (KeyError, IndexError, ValueError, RuntimeError) as reason:
        raise _error(f"'{source}': the {what} could not be converted from the original layout "
                     f"({type(reason).__name__}: {first_line(reason)}); expected SDXL base's {what}") from None


def _check_sdxl_keys(keys: list[str], name: str) -> None:
    missing = [(what, prefix) for what, prefix in SINGLE_FILE_PARTS if not any(k.startswith(prefix) for k in keys)]
    if not missing:
        return
    family, looks_like = _keys_family(keys)
    found = f"it looks like {looks_like}" if looks_like and family != "sdxl" else f"found {', '.join(keys[:3]) or 'no tensors'}"
    missing.sort(key=lambda part: part[1] != CLIP_G_PREFIX)  # bigG is what tells SDXL base from the others
    what, prefix = missing[0]
    raise _error(f"'{name}' is not an SDXL base checkpoint (no {what}: {prefix}* keys; {found}); expected UNet, VAE, "
                 "CLIP-L and OpenCLIP bigG weights in sd_xl_base_1.0's single-file layout")


# --- the diffusers folder ------------------------------------------------------------


def load_sdxl_folder(folder: str | Path, dtype: torch.dtype = torch.float32, with_unet: bool = True) -> SDXLParts:
    """SDXL base from a diffusers folder, offline; every part's weights cast to ``dtype``.

    The UNet and VAE are built on the meta device and take the tensors of their
    ``diffusion_pytorch_model`` file(s) (``.safetensors``, sharded, the ``.fp16`` variant, or ``.bin``);
    the text encoders load through transformers (which also builds without a random copy).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        where = "is a file, not a folder" if folder.exists() else "does not exist"
        raise _error(f"SDXL folder '{folder}' {where}; expected a diffusers model folder")
    missing = [name for name in FOLDER_PARTS if not (folder / name).is_dir()]
    if missing:
        family, looks_like = _folder_family(folder)
        hint = ""
        if looks_like and family != "sdxl":
            hint = f" (it looks like {looks_like}{'; pass it as model.sd15' if family == 'sd15' else ''})"
        raise _error(
            f"SDXL folder '{folder}' has no {', '.join(m + '/' for m in missing)}{hint}; "
            "expected a diffusers SDXL base folder (unet/, vae/, text_encoder/, text_encoder_2/) or a single-file checkpoint"
        )
    unet = _load_diffusers_part(UNet2DConditionModel, folder, "unet", dtype) if with_unet else None
    vae = _load_diffusers_part(AutoencoderKL, folder, "vae", dtype)
    text_encoder = _load_transformers_part(CLIPTextModel, folder, "text_encoder", dtype)
    text_encoder_2 = _load_transformers_part(CLIPTextModelWithProjection, folder, "text_encoder_2", dtype)

    def optional(name):
        return folder / name if (folder / name).is_dir() else None

    parts = SDXLParts(unet, vae, text_encoder, text_encoder_2, optional("tokenizer"), optional("tokenizer_2"),
                      optional("scheduler"))
    _check_consistent(parts, str(folder))
    return parts


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
                raise _error(f"'{index}' could not be read ({first_line(reason)}); expected a safetensors shard index") from None
            return [sub / shard for shard in shards]
        if (sub / f"{stem}.bin").is_file():
            return [sub / f"{stem}.bin"]
    return []


def _load_diffusers_part(cls, folder: Path, name: str, dtype: torch.dtype):
    source = f"SDXL folder '{folder}'"
    try:
        config = dict(cls.load_config(str(folder), subfolder=name, local_files_only=True))
    except (OSError, ValueError) as reason:
        raise _error(f"{source}: {name}/ could not be read ({first_line(reason)})") from None
    files = _diffusers_weight_files(folder / name)
    if not files:
        raise _error(f"{source}: {name}/ has no weights; expected {DIFFUSERS_WEIGHT_STEMS[0]}.safetensors (or .bin)")
    state = {}
    for path in files:
        if not path.is_file():
            raise _error(f"{source}: {name}/ lacks the shard {path.name} its index names; expected every shard")
        with _open_checkpoint(path) as weights:
            state.update(weights.take("", dtype))
    try:
        return _materialise(lambda: cls.from_config(config), state, f"{name}/", str(folder), f"complete SDXL base weights in {name}/")
    except (TypeError, ValueError) as reason:  # a config the class cannot build
        raise _error(f"{source}: {name}/ could not be read ({first_line(reason)})") from None


def _load_transformers_part(cls, folder: Path, name: str, dtype: torch.dtype):
    source = f"SDXL folder '{folder}'"
    try:
        model, info = cls.from_pretrained(str(folder), subfolder=name, local_files_only=True, dtype=dtype,
                                          output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as reason:
        raise _error(f"{source}: {name}/ could not be read ({first_line(reason)})") from None
    missing = sorted(k for k in info.get("missing_keys", []) if not k.endswith(IGNORED_SUFFIXES))
    if missing:  # would silently train against randomly initialised weights
        raise _error(f"{source}: {name}/ lacks {len(missing)} weights (e.g. {missing[0]}); expected complete SDXL base weights")
    return model.eval()


def _check_consistent(parts: SDXLParts, source: str) -> None:
    """The text encoders' widths make the UNet's context (768 + 1280 = 2048) and pooled input (1280 + 6 x 256)."""
    if parts.unet is None:
        return
    unet = parts.unet.config
    widths = (parts.text_encoder.config.hidden_size, parts.text_encoder_2.config.hidden_size)
    if widths != (CLIP_L_WIDTH, CLIP_G_WIDTH) or sum(widths) != unet.cross_attention_dim:
        raise _error(f"'{source}': text encoders {widths[0]} and {widths[1]} wide for a UNet with "
                     f"{unet.cross_attention_dim}-d context; expected SDXL base's {CLIP_L_WIDTH} + {CLIP_G_WIDTH} = 2048")
    pooled = parts.text_encoder_2.config.projection_dim
    added = unet.projection_class_embeddings_input_dim
    if unet.addition_embed_type != "text_time" or added != pooled + 6 * unet.addition_time_embed_dim:
        raise _error(f"'{source}': the UNet's added conditioning ({unet.addition_embed_type}, {added} wide) does not take "
                     f"the {pooled}-d pooled text embedding and 6 size embeddings; expected SDXL base's text_time (2816)")
