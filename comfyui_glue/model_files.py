"""Finding the released adapter and encoder files by the names users give them.

The unified loader's presets name a released adapter and the encoder it was
trained with; the files are found by case-insensitive patterns on their names
(relative paths in the model folders, so a copied ``models/image_encoder``
folder is found too). What the files hold is still checked from their tensors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..ipadapter.architecture import Architecture
from .interface import PRESETS

VIT_H = "ViT-H/14"
VIT_BIGG = "ViT-bigG/14"

# preset -> adapter file stems (first match wins), per family id
ADAPTER_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "sd15": {
        "light": ("ip-adapter_sd15_light_v11", "ip-adapter_sd15_light"),
        "standard": ("ip-adapter_sd15",),
        "vit-bigg": ("ip-adapter_sd15_vit-g",),
        "plus": ("ip-adapter-plus_sd15",),
        "plus-face": ("ip-adapter-plus-face_sd15",),
        "full-face": ("ip-adapter-full-face_sd15",),
    },
    "sdxl": {
        "standard": ("ip-adapter_sdxl_vit-h",),
        "vit-bigg": ("ip-adapter_sdxl",),
        "plus": ("ip-adapter-plus_sdxl_vit-h",),
        "plus-face": ("ip-adapter-plus-face_sdxl_vit-h",),
    },
}
ENCODER_OF_PRESET = {"vit-bigg": VIT_BIGG}  # every other preset: ViT-H/14
ENCODER_NAMES = {
    VIT_H: ("clip-vit-h-14-laion2b-s32b-b79k", "vit-h-14-laion2b-s32b-b79k", "clip-vit-h-14", "vit-h-14",
            "models/image_encoder/model", "models/image_encoder/pytorch_model"),
    VIT_BIGG: ("clip-vit-bigg-14-laion2b-39b-b160k", "vit-bigg-14-laion2b-39b-b160k", "clip-vit-bigg-14", "vit-bigg-14",
               "sdxl_models/image_encoder/model", "sdxl_models/image_encoder/pytorch_model"),
}
EXTENSIONS = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


@dataclass(frozen=True)
class PresetFiles:
    adapter: str  # relative name in the ipadapter folder
    encoder: str  # relative name in the clip_vision folder
    encoder_kind: str


def _stem(name: str) -> str:
    name = name.replace("\\", "/").lower()
    for extension in EXTENSIONS:
        if name.endswith(extension):
            return name[: -len(extension)]
    return name


def find_file(names: list[str], wanted: tuple[str, ...]) -> str | None:
    """The first of ``names`` whose stem is one of ``wanted`` (a folder prefix allowed), in ``wanted``'s order."""
    for pattern in wanted:
        regex = re.compile(rf"(^|.*/){re.escape(pattern)}$")
        for name in sorted(names):
            if regex.match(_stem(name)):
                return name
    return None


def preset_files(architecture: Architecture, preset: str, adapter_names: list[str], encoder_names: list[str],
                 adapter_folders: list[str], encoder_folders: list[str]) -> PresetFiles:
    """The adapter and encoder files of a preset for this family; a missing one is a one-line error."""
    if preset not in PRESETS:
        raise ValueError(f"preset '{preset}' is unknown; expected one of {', '.join(PRESETS)}")
    by_preset = ADAPTER_NAMES[architecture.id]
    if preset not in by_preset:
        offered = ", ".join(p for p in PRESETS if p in by_preset)
        raise ValueError(f"preset '{preset}' has no {architecture.name} adapter; expected one of {offered} for this MODEL")
    wanted = by_preset[preset]
    adapter = find_file(adapter_names, wanted)
    if adapter is None:
        raise FileNotFoundError(
            f"no {architecture.name} '{preset}' adapter found: looked for {', '.join(w + '.safetensors/.bin' for w in wanted)} "
            f"in {', '.join(adapter_folders) or 'no ipadapter folder'}"
        )
    kind = ENCODER_OF_PRESET.get(preset, VIT_H)
    encoder = find_file(encoder_names, ENCODER_NAMES[kind])
    if encoder is None:
        raise FileNotFoundError(
            f"no {kind} image encoder found for '{adapter}': looked for {', '.join(ENCODER_NAMES[kind])} "
            f"(.safetensors/.bin, any case) in {', '.join(encoder_folders) or 'no clip_vision folder'}"
        )
    return PresetFiles(adapter, encoder, kind)
