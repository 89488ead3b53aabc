"""The registry: the model families, image encoders and adapter variants this project knows, and how each
is recognised (from an adapter's tensors, a ComfyUI UNet, a diffusers UNet or model folder, a single file).

Everything about a family is its entry in ``families.py``; code elsewhere asks the registry and
names no family. Plain data and Python: no torch, no ComfyUI, no trainer.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from .encoders import ENCODERS
from .families import FAMILIES as _BUILT_IN, UNSUPPORTED_CONTEXT_WIDTHS, UNSUPPORTED_SINGLE_FILES
from .schema import (AttachKind, DiTVariant, Family, ImageEncoderKind, Layer, TextEncoder, Training, Variant, dit_layers,
                     unet_layers)
from .variants import PRESETS, VARIANTS

__all__ = [
    "AttachKind", "DiTVariant", "Family", "ImageEncoderKind", "Layer", "TextEncoder", "Training", "Variant", "dit_layers",
    "unet_layers", "ENCODERS", "PRESETS", "VARIANTS", "families", "register_family", "family_by_id", "family_names",
    "family_of_adapter_keys", "family_of_adapter_layers", "variants_of", "trainable_families", "family_of_comfy_layout", "family_of_processor_names", "family_of_single_file",
    "family_of_model_folder", "official_keys_from_processor_names", "encoder_by_id", "encoder_of_widths",
    "variant_by_name", "trainable_variants", "export_stem",
]

_FAMILIES: list[Family] = list(_BUILT_IN)


def families() -> tuple[Family, ...]:
    return tuple(_FAMILIES)


def register_family(family: Family) -> Family:
    """Add a family (a plug-in, or a test's made-up one); every lookup below sees it from then on."""
    if any(known.id == family.id for known in _FAMILIES):
        raise ValueError(f"model family '{family.id}' is registered already; expected a new id")
    _FAMILIES.append(family)
    return family


def unregister_family(family: Family) -> None:
    _FAMILIES.remove(family)


def family_names(trainable: bool = False) -> str:
    """``"SD1.5 or SDXL or ..."``; ``trainable``: only the families the trainer makes adapters for."""
    return " or ".join(family.name for family in (trainable_families() if trainable else _FAMILIES))


def family_by_id(family_id: str) -> Family:
    found = next((family for family in _FAMILIES if family.id == family_id), None)
    if found is None:
        raise ValueError(f"model family '{family_id}' is unknown; expected one of {', '.join(f.id for f in _FAMILIES)}")
    return found


# --- recognising a family ------------------------------------------------------------


def family_of_adapter_keys(tensor_names: Iterable[str]) -> Family | None:
    """The family whose layer table gives exactly these ``ip_adapter`` tensor names, if any."""
    names = set(tensor_names)
    return next((family for family in _FAMILIES if family.adapter_tensor_names() == names), None)


def family_of_adapter_layers(layer_keys: Iterable[int]) -> list[tuple[Family, Variant]]:
    """The (family, variant) pairs whose adapters carry exactly these layer keys (XLabs: Flux's double blocks)."""
    keys = set(layer_keys)
    return [(family, variant) for family in _FAMILIES for variant in variants_of(family)
            if set(family.preset_keys(variant.layers)) == keys]


def family_of_comfy_layout(patch_keys: Iterable[tuple], context_dim: int | None) -> Family | None:
    """The family of a ComfyUI model with image layers at ``patch_keys`` and this text-token width (a UNet's).

    A DiT (``context_dim`` None) is told by its blocks alone: the family whose block table holds them all, the
    exact one first. Fewer blocks are a reduced-depth copy (tests, distilled models such as Flux.1 Lite): the
    adapter's other blocks have nothing to patch; the widths are checked against the adapter when it is applied."""
    patch_keys = set(patch_keys)
    exact = next((family for family in _FAMILIES if set(family.layer_by_patch_key) == patch_keys
                  and (family.context_dim == context_dim or (context_dim is None and not family.attach.is_unet))), None)
    if exact is not None or context_dim is not None:
        return exact
    kinds = {key[0] for key in patch_keys}
    return next((family for family in _FAMILIES if not family.attach.is_unet and patch_keys <= set(family.layer_by_patch_key)
                 and kinds == {layer.comfy_block[0] for layer in family.layers}), None)


def official_keys_from_processor_names(processor_names: list[str]) -> dict[str, int]:
    """Number the cross-attention processors the way the official checkpoints do: a layer's key is its
    position in diffusers' ``list(unet.attn_processors)``; only ``attn2`` entries carry adapter weights."""
    return {name: index for index, name in enumerate(processor_names) if name.endswith("attn2.processor")}


def family_of_processor_names(processor_names: Iterable[str]) -> Family | None:
    """The family of a diffusers UNet, from its ``attn_processors`` order."""
    found = official_keys_from_processor_names(list(processor_names))
    return next((family for family in _FAMILIES
                 if found == {layer.diffusers_processor: layer.key for layer in family.layers}), None)


def family_of_single_file(keys: Iterable[str]) -> tuple[Family | None, str | None]:
    """(family, what it looks like) of a base model's single file, from its tensor names alone."""
    keys = list(keys)

    def has(prefix):
        return any(key.startswith(prefix) for key in keys)

    # the family with the most text encoders first: SDXL's first prefix is not SD1.5's, but a superset rule
    # must not let a one-encoder family claim a two-encoder file
    for family in sorted(trainable_families(), key=lambda f: -len(f.training.text_encoders)):
        if all(has(encoder.single_file_prefix) for encoder in family.training.text_encoders):
            return family, f"an {family.name} checkpoint"
    for prefix, looks_like in UNSUPPORTED_SINGLE_FILES:
        if has(prefix):
            return None, looks_like
    return None, None


def family_of_model_folder(folder: Path) -> tuple[Family | None, str | None]:
    """(family, what it looks like) of a diffusers model folder: its UNet's text-token width when its
    ``unet/config.json`` is readable, else which text-encoder folders it has."""
    folder = Path(folder)
    for family in trainable_families():  # a DiT's folder names its transformer's class
        facts = family.training
        if facts.denoiser_folder != "unet" and _config_class(folder / facts.denoiser_folder) == facts.denoiser_class:
            return family, f"an {family.name} model folder"
    try:
        width = json.loads((folder / "unet" / "config.json").read_text()).get("cross_attention_dim")
    except (OSError, ValueError, AttributeError):
        width = None
    if width is not None:
        family = next((f for f in trainable_families() if f.context_dim == width), None)
        if family is not None:
            return family, f"an {family.name} model folder"
        return None, UNSUPPORTED_CONTEXT_WIDTHS.get(width if isinstance(width, int) else -1)
    for family in sorted(trainable_families(), key=lambda f: -len(f.training.text_encoders)):
        if (folder / "unet").is_dir() and all((folder / e.folder).is_dir() for e in family.training.text_encoders):
            return family, f"an {family.name} model folder"
    return None, None


def _config_class(part: Path) -> str | None:
    try:
        return json.loads((part / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


# --- encoders and variants -------------------------------------------------------------


def encoder_by_id(encoder_id: str) -> ImageEncoderKind:
    found = next((encoder for encoder in ENCODERS if encoder.id == encoder_id), None)
    if found is None:
        raise ValueError(f"image encoder '{encoder_id}' is unknown; expected one of {', '.join(e.id for e in ENCODERS)}")
    return found


def encoder_of_widths(embed_dim: int | None = None, hidden_width: int | None = None) -> ImageEncoderKind | None:
    """The known encoder with this image-embedding width and/or hidden width, if any."""
    return next((encoder for encoder in ENCODERS
                 if embed_dim in (None, encoder.embed_dim) and hidden_width in (None, encoder.hidden_width)), None)


def variant_by_name(name: str, family: Family | None = None) -> Variant:
    """The variant of this name (made for ``family``, where rows of one name differ per family)."""
    found = next((variant for variant in VARIANTS if variant.name == name and (family is None or variant.serves(family))),
                 None)
    if found is None:
        names = sorted({v.name for v in VARIANTS if family is None or v.serves(family)})
        where = f" for {family.name}" if family is not None else ""
        raise ValueError(f"adapter variant '{name}' is unknown{where}; expected one of {', '.join(names)}")
    return found


def variants_of(family: Family) -> tuple[Variant, ...]:
    return tuple(variant for variant in VARIANTS if variant.serves(family))


def trainable_families() -> tuple[Family, ...]:
    """The families the trainer makes adapters for (their entries have training facts)."""
    return tuple(family for family in _FAMILIES if family.training is not None)


def trainable_variants() -> tuple[str, ...]:
    return tuple(variant.name for variant in VARIANTS if variant.trainable)


def export_stem(variant: Variant, family: Family, encoder: ImageEncoderKind) -> str:
    """The released files' naming rule: ``ip-adapter[-variant]_<family>[_light][_<encoder>]``, the encoder named
    only when it is not the family's own (``ip-adapter_sdxl_vit-h``, ``ip-adapter_sd15_vit-g``)."""
    tag = "" if encoder.id == family.native_encoder else f"_{encoder.file_tag}"
    return f"{variant.file_prefix}_{family.id}{variant.file_suffix}{tag}"
