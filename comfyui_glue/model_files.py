"""Finding the released adapter and encoder files by the names users give them.

The unified loader's presets name a released adapter and the encoder it was
trained with; the files are found by case-insensitive patterns on their names
(relative paths in the model folders, so a copied ``models/image_encoder``
folder is found too). What the files hold is still checked from their tensors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..ipadapter.registry import PRESETS, Family, encoder_by_id

EXTENSIONS = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


@dataclass(frozen=True)
class PresetFiles:
    adapter: str  # relative name in the ipadapter folder: the first candidate
    encoder: str  # relative name in the clip_vision folder
    encoder_kind: str
    adapters: tuple[str, ...] = ()  # every file with one of the preset's names, best first (several releases share
    # a name: XLabs' v1 and v2 are both ip_adapter.safetensors, InstantX's Flux and SD3.5 both ip-adapter.bin)


def _stem(name: str) -> str:
    name = name.replace("\\", "/").lower()
    for extension in EXTENSIONS:
        if name.endswith(extension):
            return name[: -len(extension)]
    return name


def find_files(names: list[str], wanted: tuple[str, ...], hints: tuple[str, ...] = ()) -> list[str]:
    """``names`` whose stem is one of ``wanted`` (a folder prefix allowed), in ``wanted``'s order; among equal names,
    those whose path says one of ``hints`` (the family) first, then a later version (``v2``)."""
    found = []
    for pattern in wanted:
        regex = re.compile(rf"(^|.*/){re.escape(pattern)}$")
        matches = [name for name in sorted(names) if regex.match(_stem(name)) and name not in found]
        found += sorted(matches, key=lambda name: (not any(hint in name.lower() for hint in hints),
                                                   "v2" not in name.lower()))
    return found


def find_file(names: list[str], wanted: tuple[str, ...]) -> str | None:
    """The first of ``names`` whose stem is one of ``wanted`` (a folder prefix allowed), in ``wanted``'s order."""
    found = find_files(names, wanted)
    return found[0] if found else None


def preset_files(architecture: Family, preset: str, adapter_names: list[str], encoder_names: list[str],
                 adapter_folders: list[str], encoder_folders: list[str]) -> PresetFiles:
    """The adapter and encoder files of a preset for this family (its released names, in the registry); a missing
    one is a one-line error."""
    if preset not in PRESETS:
        raise ValueError(f"preset '{preset}' is unknown; expected one of {', '.join(PRESETS)}")
    by_preset = architecture.released_adapters
    if preset not in by_preset:
        offered = ", ".join(p for p in PRESETS if p in by_preset)
        raise ValueError(f"preset '{preset}' has no {architecture.name} adapter; expected one of {offered} for this MODEL")
    wanted = by_preset[preset]
    adapters = find_files(adapter_names, wanted, (architecture.id, architecture.name.lower().split()[0]))
    adapter = adapters[0] if adapters else None
    if adapter is None:
        raise FileNotFoundError(
            f"no {architecture.name} '{preset}' adapter found: looked for {', '.join(w + '.safetensors/.bin' for w in wanted)} "
            f"in {', '.join(adapter_folders) or 'no ipadapter folder'}"
        )
    kind = encoder_by_id(PRESETS[preset][1])
    encoder = find_file(encoder_names, kind.file_stems)
    if encoder is None:
        raise FileNotFoundError(
            f"no {kind.name} image encoder found for '{adapter}': looked for {', '.join(kind.file_stems)} "
            f"(.safetensors/.bin, any case) in {', '.join(encoder_folders) or 'no clip_vision folder'}"
        )
    return PresetFiles(adapter, encoder, kind.name, tuple(adapters))
