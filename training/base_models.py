"""A family's base model from the user's files, offline: a diffusers folder or a single-file checkpoint.

What to read comes from the family's registry entry (``ipadapter.registry``): its text encoders
(diffusers subfolder, single-file prefix, key layout, width), the UNet and VAE prefixes. Single
files are read with the configs shipped in ``configs/<family>/``:

* ``model.diffusion_model.*``: the UNet (diffusers' ldm converter);
* ``first_stage_model.*``: the VAE (diffusers' ldm converter);
* each text encoder's prefix: transformers CLIP keys (``clip`` layout) or OpenCLIP's (``open_clip``:
  fused ``in_proj``, ``text_projection`` applied as ``x @ P``; diffusers' open_clip converter).

:func:`detect_family` tells the family by the keys or the folder layout alone, without loading.

Memory: no part exists twice. Each model is built on the ``meta`` device (no random
initialisation, no storage) and takes the file's tensors as its parameters
(``load_state_dict(assign=True)``); the single file is opened lazily (safetensors
``safe_open``, a ``.ckpt`` memory-mapped) and read one part at a time, each tensor cast to
``dtype`` as it is read, so the peak is the loaded models plus one tensor. Measured on the
full-size random SDXL file (6.9 GB fp16; 2 CPU cores, file in the page cache), process
memory over the 0.45 GiB of imports: ``dtype=torch.bfloat16`` peaks at 6.8 GiB anonymous
memory (the models are 6.46 GiB) and takes 25 s; ``torch.float16`` (the file's own dtype)
adds 0.3 GiB and takes 1.3-5.4 s, because safetensors hands out copy-on-write mapped pages
of the file, so the weights stay page cache until written.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ipadapter.registry import Family, TextEncoder, family_names, family_of_model_folder, family_of_single_file

from .errors import ModelFileError
from .weight_files import diffusers_part, load_folder_part, open_checkpoint, text_encoder_part

CONFIG_ROOT = Path(__file__).parent / "configs"
TIME_IDS = 6  # original size, crop top-left, target size

log = logging.getLogger("training")


@dataclass
class BaseModelParts:
    unet: UNet2DConditionModel | None  # None: not read (in ``skip``)
    vae: AutoencoderKL
    text_encoders: dict[str, torch.nn.Module | None]  # by the family's text-encoder folder name
    tokenizer_dirs: dict[str, Path | None] = field(default_factory=dict)  # a folder's tokenizer/, tokenizer_2/...
    scheduler_dir: Path | None = None  # a folder's scheduler/ (None: the family's training schedule)


def config_dir(family: Family) -> Path:
    """The configs shipped for the family's parts (single files and the embedded run read them)."""
    return CONFIG_ROOT / (family.training.shipped_configs or family.id)


def text_encoder_class(encoder: TextEncoder):
    return CLIPTextModelWithProjection if encoder.pooled else CLIPTextModel


def tokenizer_folder(encoder: TextEncoder) -> str:
    """``text_encoder`` -> ``tokenizer``, ``text_encoder_2`` -> ``tokenizer_2``: diffusers' folder pairs."""
    return encoder.folder.replace("text_encoder", "tokenizer")


# --- which family --------------------------------------------------------------------


def detect_family(path: str | Path, option: str = "model.base") -> Family:
    """The family of a base model folder or single file; a missing or unrecognised one is a one-line error."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(f"base model '{path}' ({option}) does not exist; "
                             "expected a diffusers model folder or a single-file .safetensors")
    if path.is_file():
        with open_checkpoint(path) as weights:  # an unreadable file says why
            family, what = family_of_single_file(weights.keys)
            found = ", ".join(weights.keys[:3]) or "no tensors"
    else:
        family, what = family_of_model_folder(path)
        found = ", ".join(sorted(p.name + "/" for p in path.iterdir() if p.is_dir())[:4]) or "no subfolders"
    if family is None:
        seen = f"it looks like {what}" if what else f"found {found}"
        raise ModelFileError(f"'{path.name}' ({option}) is not a base model of {family_names(trainable=True)} ({seen}); "
                             "expected a diffusers model folder or a single-file checkpoint of one of them")
    return family


# --- loading ---------------------------------------------------------------------------


def load_base_model(path: str | Path, family: Family, dtype: torch.dtype = torch.float32,
                    skip: tuple[str, ...] = ()) -> BaseModelParts:
    """The UNet, VAE and text encoders of ``family`` from a folder or single file, in ``dtype``; the parts named
    in ``skip`` (``unet``, a text encoder's folder name) are not read."""
    path = Path(path).expanduser()
    parts = (load_folder if path.is_dir() else load_single_file)(path, family, dtype, skip)
    check_consistent(parts, family, str(path))
    return parts


def load_single_file(path: Path, family: Family, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> BaseModelParts:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    facts, configs, name = family.training, config_dir(family), path.name
    expected = f"{family.name}'s UNet, VAE and text encoders in the original single-file layout"
    with open_checkpoint(path) as weights:
        check_single_file_keys(weights.keys, family, name)
        unet = None
        if "unet" not in skip:
            unet = diffusers_part(weights, UNet2DConditionModel, configs / "unet", facts.unet_prefix,
                                  convert_ldm_unet_checkpoint, "UNet", family.name, expected, dtype)
        vae = diffusers_part(weights, AutoencoderKL, configs / "vae", facts.vae_prefix, convert_ldm_vae_checkpoint,
                             "VAE", family.name, expected, dtype)
        text_encoders = {}
        for encoder in facts.text_encoders:
            if encoder.folder in skip:
                text_encoders[encoder.folder] = None
                continue
            if encoder.layout == "open_clip":  # splits each fused in_proj into q/k/v, transposes text_projection
                prefix = encoder.single_file_prefix
                converter = lambda part, template, prefix=prefix: convert_open_clip_checkpoint(template, part, prefix=prefix)  # noqa: E731
            else:  # strips the prefix: transformers keys (text_model.…) remain
                converter = lambda part, _: convert_ldm_clip_checkpoint(part)  # noqa: E731
            text_encoders[encoder.folder] = text_encoder_part(
                weights, text_encoder_class(encoder), configs / encoder.folder / "config.json", encoder.single_file_prefix,
                converter, encoder.name, expected, dtype)
    return BaseModelParts(unet, vae, text_encoders)


def check_single_file_keys(keys: list[str], family: Family, name: str) -> None:
    facts = family.training
    parts = [("UNet", facts.unet_prefix), ("VAE", facts.vae_prefix),
             *((encoder.name, encoder.single_file_prefix) for encoder in facts.text_encoders)]
    missing = [(what, prefix) for what, prefix in parts if not any(key.startswith(prefix) for key in keys)]
    if not missing:
        return
    found_family, what = family_of_single_file(keys)
    found = f"it looks like {what}" if what and found_family is not family else f"found {', '.join(keys[:3]) or 'no tensors'}"
    missing.sort(key=lambda part: part[1] != facts.text_encoders[-1].single_file_prefix)  # the family's own encoder first
    what, prefix = missing[0]
    raise ModelFileError(f"'{name}' is not an {family.name} checkpoint (no {what}: {prefix}* keys; {found}); expected the UNet, "
                         f"VAE and text encoders of {family.name} in the original single-file layout")


def load_folder(folder: Path, family: Family, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> BaseModelParts:
    """A diffusers folder: the UNet and VAE built on the meta device from their weight files; the text encoders
    through transformers (which also builds without a random copy)."""
    encoders = family.training.text_encoders
    missing = [name for name in ("unet", "vae", *(e.folder for e in encoders)) if not (folder / name).is_dir()]
    if missing:
        found_family, what = family_of_model_folder(folder)
        hint = f" (it looks like {what})" if what and found_family is not family else ""
        subfolders = ", ".join(["unet/", "vae/", *(e.folder + "/" for e in encoders)])
        raise ModelFileError(f"{family.name} folder '{folder}' has no {', '.join(m + '/' for m in missing)}{hint}; "
                             f"expected a diffusers {family.name} folder ({subfolders}) or a single-file checkpoint")
    unet = load_folder_part(UNet2DConditionModel, folder, "unet", dtype, family.name) if "unet" not in skip else None
    vae = load_folder_part(AutoencoderKL, folder, "vae", dtype, family.name)
    text_encoders = {e.folder: None if e.folder in skip else
                     load_folder_part(text_encoder_class(e), folder, e.folder, dtype, family.name) for e in encoders}

    def optional(name):
        return folder / name if (folder / name).is_dir() else None

    return BaseModelParts(unet, vae, text_encoders, {e.folder: optional(tokenizer_folder(e)) for e in encoders},
                          optional("scheduler"))


def check_consistent(parts: BaseModelParts, family: Family, source: str) -> None:
    """The text encoders' widths make the UNet's context, and the pooled one with the time ids its added input."""
    if parts.unet is None or None in parts.text_encoders.values():
        return
    unet, facts = parts.unet.config, family.training
    widths = [parts.text_encoders[e.folder].config.hidden_size for e in facts.text_encoders]
    expected = [e.width for e in facts.text_encoders]
    if widths != expected or sum(widths) != unet.cross_attention_dim:
        raise ModelFileError(f"'{source}': text encoders {' + '.join(map(str, widths))} wide for a UNet with "
                             f"{unet.cross_attention_dim}-d context; expected {family.name}'s "
                             f"{' + '.join(map(str, expected))} = {family.context_dim}")
    if facts.time_ids:
        pooled = next(parts.text_encoders[e.folder].config.projection_dim for e in facts.text_encoders if e.pooled)
        added = unet.projection_class_embeddings_input_dim
        needed = pooled + TIME_IDS * (unet.addition_time_embed_dim or 0)
        if unet.addition_embed_type != "text_time" or added != needed:
            raise ModelFileError(f"'{source}': the UNet's added conditioning ({unet.addition_embed_type}, {added} wide) "
                                 f"does not take the {pooled}-d pooled text embedding and {TIME_IDS} size embeddings; "
                                 f"expected {family.name}'s text_time")
