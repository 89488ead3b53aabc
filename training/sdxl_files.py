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

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection


from .checkpoint_files import diffusers_part, load_folder_part, open_checkpoint, text_encoder_part
from .errors import ModelFileError

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

log = logging.getLogger("training")


@dataclass
class SDXLParts:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel  # CLIP ViT-L/14, 768 wide
    text_encoder_2: CLIPTextModelWithProjection  # OpenCLIP ViT-bigG/14, 1280 wide, projection_dim 1280
    tokenizer_dir: Path | None  # the folder's tokenizer/ (None: a single file, or a folder without one)
    tokenizer_2_dir: Path | None  # tokenizer_2/ (SDXL's pads with "!", id 0, where tokenizer/ pads with the end token)
    scheduler_dir: Path | None  # scheduler/ (None: training.models.family_scheduler uses the shipped DDPM config)


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
    with open_checkpoint(path) as weights:
        return list(weights.keys)


# --- the single file -----------------------------------------------------------------


def load_sdxl_single_file(path: str | Path, dtype: torch.dtype = torch.float32, skip: tuple[str, ...] = ()) -> SDXLParts:
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
    with open_checkpoint(path) as weights:
        _check_sdxl_keys(weights.keys, name)
        expected = "the complete SDXL base weights of sd_xl_base_1.0's single-file layout"

        unet = text_encoder = text_encoder_2 = None  # parts in ``skip`` are not read (the run never uses them)
        if "unet" not in skip:
            unet = diffusers_part(weights, UNet2DConditionModel, SDXL_CONFIG_DIR / "unet", UNET_PREFIX,
                                  convert_ldm_unet_checkpoint, "UNet", "SDXL base", expected, dtype)
        vae = diffusers_part(weights, AutoencoderKL, SDXL_CONFIG_DIR / "vae", VAE_PREFIX, convert_ldm_vae_checkpoint,
                             "VAE", "SDXL base", expected, dtype)
        if "text_encoder" not in skip:  # the converter strips the prefix: transformers keys (text_model.…) remain
            text_encoder = text_encoder_part(weights, CLIPTextModel, SDXL_CONFIG_DIR / "text_encoder" / "config.json",
                                             CLIP_L_PREFIX, lambda part, _: convert_ldm_clip_checkpoint(part),
                                             "CLIP-L text encoder", expected, dtype)
        if "text_encoder_2" not in skip:  # splits each fused in_proj into q/k/v, transposes text_projection
            text_encoder_2 = text_encoder_part(
                weights, CLIPTextModelWithProjection, SDXL_CONFIG_DIR / "text_encoder_2" / "config.json", CLIP_G_PREFIX,
                lambda part, template: convert_open_clip_checkpoint(template, part, prefix=CLIP_G_PREFIX),
                "OpenCLIP bigG text encoder", expected, dtype)
    parts = SDXLParts(unet, vae, text_encoder, text_encoder_2, None, None, None)
    _check_consistent(parts, name)
    return parts


def _check_sdxl_keys(keys: list[str], name: str) -> None:
    missing = [(what, prefix) for what, prefix in SINGLE_FILE_PARTS if not any(k.startswith(prefix) for k in keys)]
    if not missing:
        return
    family, looks_like = _keys_family(keys)
    found = f"it looks like {looks_like}" if looks_like and family != "sdxl" else f"found {', '.join(keys[:3]) or 'no tensors'}"
    missing.sort(key=lambda part: part[1] != CLIP_G_PREFIX)  # bigG is what tells SDXL base from the others
    what, prefix = missing[0]
    raise ModelFileError(f"'{name}' is not an SDXL base checkpoint (no {what}: {prefix}* keys; {found}); expected UNet, VAE, "
                 "CLIP-L and OpenCLIP bigG weights in sd_xl_base_1.0's single-file layout")


# --- the diffusers folder ------------------------------------------------------------


def load_sdxl_folder(folder: str | Path, dtype: torch.dtype = torch.float32, skip: tuple[str, ...] = ()) -> SDXLParts:
    """SDXL base from a diffusers folder, offline; every part's weights cast to ``dtype``.

    The UNet and VAE are built on the meta device and take the tensors of their
    ``diffusion_pytorch_model`` file(s) (``.safetensors``, sharded, the ``.fp16`` variant, or ``.bin``);
    the text encoders load through transformers (which also builds without a random copy).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        where = "is a file, not a folder" if folder.exists() else "does not exist"
        raise ModelFileError(f"SDXL folder '{folder}' {where}; expected a diffusers model folder")
    missing = [name for name in FOLDER_PARTS if not (folder / name).is_dir()]
    if missing:
        family, looks_like = _folder_family(folder)
        hint = ""
        if looks_like and family != "sdxl":
            hint = f" (it looks like {looks_like}{'; pass it as model.sd15' if family == 'sd15' else ''})"
        raise ModelFileError(
            f"SDXL folder '{folder}' has no {', '.join(m + '/' for m in missing)}{hint}; "
            "expected a diffusers SDXL base folder (unet/, vae/, text_encoder/, text_encoder_2/) or a single-file checkpoint"
        )
    unet = load_folder_part(UNet2DConditionModel, folder, "unet", dtype, "SDXL") if "unet" not in skip else None
    vae = load_folder_part(AutoencoderKL, folder, "vae", dtype, "SDXL")
    text_encoder = text_encoder_2 = None
    if "text_encoder" not in skip:
        text_encoder = load_folder_part(CLIPTextModel, folder, "text_encoder", dtype, "SDXL")
    if "text_encoder_2" not in skip:
        text_encoder_2 = load_folder_part(CLIPTextModelWithProjection, folder, "text_encoder_2", dtype, "SDXL")

    def optional(name):
        return folder / name if (folder / name).is_dir() else None

    parts = SDXLParts(unet, vae, text_encoder, text_encoder_2, optional("tokenizer"), optional("tokenizer_2"),
                      optional("scheduler"))
    _check_consistent(parts, str(folder))
    return parts


def _check_consistent(parts: SDXLParts, source: str) -> None:
    """The text encoders' widths make the UNet's context (768 + 1280 = 2048) and pooled input (1280 + 6 x 256)."""
    if None in (parts.unet, parts.text_encoder, parts.text_encoder_2):
        return
    unet = parts.unet.config
    widths = (parts.text_encoder.config.hidden_size, parts.text_encoder_2.config.hidden_size)
    if widths != (CLIP_L_WIDTH, CLIP_G_WIDTH) or sum(widths) != unet.cross_attention_dim:
        raise ModelFileError(f"'{source}': text encoders {widths[0]} and {widths[1]} wide for a UNet with "
                     f"{unet.cross_attention_dim}-d context; expected SDXL base's {CLIP_L_WIDTH} + {CLIP_G_WIDTH} = 2048")
    pooled = parts.text_encoder_2.config.projection_dim
    added = unet.projection_class_embeddings_input_dim
    if unet.addition_embed_type != "text_time" or added != pooled + 6 * unet.addition_time_embed_dim:
        raise ModelFileError(f"'{source}': the UNet's added conditioning ({unet.addition_embed_type}, {added} wide) does not take "
                     f"the {pooled}-d pooled text embedding and 6 size embeddings; expected SDXL base's text_time (2816)")
