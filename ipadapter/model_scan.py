"""What a weights file is, from its tensor shapes alone, and which file a preset wants.

Users name their files as they like (``model.safetensors``, ``adapter-v2.bin``), keep them in
folders set in ``extra_model_paths.yaml``, and releases share names (XLabs' v1 and v2 are both
``ip_adapter.safetensors``). So files are told apart by their tensors: a safetensors header or a
weights-only, memory-mapped load of a torch file gives the shapes, and the same detection that
loads an adapter or an encoder classifies it, on shape-only ("meta") tensors. Classifications
are cached by path, size and modification time.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .registry import PRESETS, VARIANTS, Family, encoder_by_id, encoder_of_widths, families, variant_by_name

# presets told from their neighbours by the file name only (the tensors are those of standard / plus / faceid-plus)
NAME_ONLY_WORDS = {"light": "light", "plus-face": "face",
                   **{preset: variant.name_word for preset, (name, _) in PRESETS.items() for variant in VARIANTS
                      if variant.name == name and variant.name_word}}


@dataclass(frozen=True)
class FileKind:
    name: str  # as listed in its folder
    kind: str  # "adapter", "encoder" or "other"
    description: str  # "SD1.5 plus (16 tokens, OpenCLIP ViT-H/14 penultimate 1280-d)"
    family: str | None = None  # adapters: the family id
    projection: str | None = None  # adapters: Variant.projection
    encoder: str | None = None  # adapters: the encoder id they need; encoders: their own id


def tensor_shapes(path: Path) -> dict:
    """A file's tensors as shape-only ``meta`` tensors (nested dicts kept), without reading their data."""
    import torch
    from safetensors import safe_open

    with path.open("rb") as handle:
        head = handle.read(9)
    if path.suffix == ".safetensors" or head[8:9] == b"{":  # a safetensors header, whatever the suffix says
        with safe_open(str(path), framework="pt") as handle:
            return {key: torch.empty(handle.get_slice(key).get_shape(), dtype=torch.float16, device="meta")
                    for key in handle.keys()}
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (not zip) torch file cannot be memory-mapped
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)

    def meta(value):
        if isinstance(value, dict):
            return {key: meta(item) for key, item in value.items()}
        return torch.empty(value.shape, dtype=value.dtype, device="meta") if isinstance(value, torch.Tensor) else value

    return meta(loaded) if isinstance(loaded, dict) else {}


def classify(path: str | os.PathLike, name: str | None = None) -> FileKind:
    """What the file at ``path`` is (cached by path, size and modification time)."""
    path = Path(path)
    stat = path.stat()
    return _classify(str(path), name or path.name, stat.st_size, stat.st_mtime)


@lru_cache(maxsize=4096)
def _classify(path: str, name: str, size: int, modified: float) -> FileKind:
    from .adapter_file import AdapterFormatError, IPAdapterCheckpoint, split_groups
    from .encoder import EncoderFormatError

    try:
        tensors = tensor_shapes(Path(path))
    except Exception as reason:  # noqa: BLE001  any file may sit in a models folder; a broken one is listed, not fatal
        return FileKind(name, "other", f"not readable as weights ({type(reason).__name__})")
    try:
        image_proj, ip_adapter = split_groups(tensors, name)
        spec = IPAdapterCheckpoint.from_state_dicts(image_proj, ip_adapter, name, base_width=None).spec
        widths = {"embed_dim" if spec.encoder_input == "image_embeds" else "hidden_width": spec.encoder_width}
        encoder = encoder_of_widths(**widths)
        return FileKind(name, "adapter", spec.describe(), spec.architecture.id, spec.projection,
                        encoder.id if encoder else None)
    except AdapterFormatError as reason:
        adapter_reason = str(reason)
    try:
        encoder, description = encoder_kind(tensors, name)
        return FileKind(name, "encoder", description, encoder=encoder.id if encoder else None)
    except EncoderFormatError:
        pass
    looks = "an IP-Adapter of an unknown layout" if any(str(key).startswith(("image_proj", "ip_adapter"))
                                                        for key in tensors) else "not an IP-Adapter or image encoder"
    return FileKind(name, "other", f"{looks} ({len(tensors)} tensors, e.g. {', '.join(map(str, list(tensors)[:2]))})")


def encoder_kind(tensors: dict, name: str):
    """(the registry's encoder, a description) for a vision tower's tensors: by its widths, depth and patch, else
    (a scaled-down copy) by its output width, else (None, its size). EncoderFormatError if it is no vision tower."""
    from .encoder import _tower_state_dict, _vision_config
    from .siglip import is_siglip, vision_tensors

    if is_siglip(tensors):
        vision = vision_tensors(tensors)
        width = next(t.shape[0] for k, t in vision.items() if k.endswith("patch_embedding.weight"))
        layers = len({k.split("layers.")[1].split(".")[0] for k in vision if ".layers." in k or k.startswith("layers.")})
        exact = next((e for e in _known() if e.layout == "siglip" and (e.hidden_width, e.layers) == (width, layers)), None)
        near = next((e for e in _known() if e.layout == "siglip"), None)
    else:
        tower = _tower_state_dict(tensors, name)
        embed_dim, config = _vision_config(tower, name, None)
        width, layers = config["width"], config["layers"]
        exact = next((e for e in _known() if e.layout != "siglip" and (e.hidden_width, e.layers, e.patch_size, e.embed_dim)
                      == (width, layers, config["patch_size"], embed_dim)), None)
        near = encoder_of_widths(embed_dim=embed_dim)
    if exact is not None:
        return exact, exact.name
    size = f"width {width}, {layers} layers"
    if near is not None:
        return near, f"a scaled-down {near.name} ({size})"
    return None, f"an image encoder of no known kind ({size})"


def _known():
    from .registry import ENCODERS

    return ENCODERS


def fits(kind: FileKind, family: Family, preset: str) -> bool:
    """Whether a file is the adapter of ``preset`` for ``family`` by its tensors (name-only presets included). An
    adapter for an encoder of no known width (a scaled-down copy) fits any; loading checks the pair."""
    variant, encoder = PRESETS[preset]
    if kind.kind != "adapter" or kind.family != family.id or preset not in family.released_adapters:
        return False
    return kind.projection == variant_by_name(variant, family).projection and kind.encoder in (encoder, None)


def presets_served(kind: FileKind) -> list[str]:
    family = next((f for f in families() if f.id == kind.family), None)
    return [preset for preset in PRESETS if family is not None and fits(kind, family, preset)]


def _stem(name: str) -> str:
    name = name.replace("\\", "/").lower()
    return name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name


def says(stem: str, word: str) -> bool:
    """Whether a name says a word: not as the start of a longer one ("face" is not said by "faceid")."""
    return re.search(re.escape(word) + r"(?![a-z])", stem) is not None


def name_rank(name: str, wanted_stems: tuple[str, ...], preset: str | None = None) -> int:
    """0: a released name (a folder prefix allowed); 1: a name that says the preset or nothing against it;
    2: a name-only preset whose word the name lacks; 3: a name that says another name-only preset."""
    stem = _stem(name)
    if any(stem == wanted or stem.endswith("/" + wanted) for wanted in wanted_stems):
        return 0
    word = NAME_ONLY_WORDS.get(preset or "")
    if word is not None:
        return 1 if says(stem, word) else 2
    # only the words of presets with the same tensors count ("face" says plus-face, not faceid-plus)
    rivals = [w for other, w in NAME_ONLY_WORDS.items() if preset is None or _projections(other) & _projections(preset)]
    return 3 if any(says(stem, other) for other in rivals) else 1


def _projections(preset: str) -> set[str]:
    return {variant.projection for variant in VARIANTS if variant.name == PRESETS[preset][0]}


class NotFound(FileNotFoundError):
    """No file fits; the message is one line that says what each candidate is and what was needed."""


def pick_adapter(family: Family, preset: str, files: dict[str, str], folders: list[str]) -> FileKind:
    """The adapter file (``files``: name -> path) for a preset: fitting tensors first, then released names."""
    if preset not in PRESETS:
        raise NotFound(f"preset '{preset}' is unknown; expected one of {', '.join(PRESETS)}")
    if preset not in family.released_adapters:
        offered = ", ".join(p for p in PRESETS if p in family.released_adapters)
        raise NotFound(f"preset '{preset}' has no {family.name} adapter; expected one of {offered} for this MODEL")
    kinds = [classify(path, name) for name, path in sorted(files.items())]
    wanted = family.released_adapters[preset]
    # light / plus-face have standard's / plus's tensors: only a name tells them, so a name must not say otherwise
    fitting = [kind for kind in kinds if fits(kind, family, preset) and name_rank(kind.name, wanted, preset) <= 1]
    if fitting:
        return min(fitting, key=lambda kind: (name_rank(kind.name, wanted, preset), kind.name))
    variant, encoder = PRESETS[preset]
    word = NAME_ONLY_WORDS.get(preset)
    needed = (f"an {family.name} {variant} adapter ({variant_by_name(variant, family).projection} projection, "
              f"for {encoder_by_id(encoder).name}" + (f"; its name must say '{word}'" if word else "") + ")")
    found = "; ".join(f"{kind.name} is {kind.description}" for kind in kinds) or "no files"
    raise NotFound(f"no file in {', '.join(folders) or 'the ipadapter folders'} is {needed}: {found}")


def pick_encoder(encoder_id: str, adapter: FileKind, files: dict[str, str], folders: list[str]) -> FileKind:
    """The image encoder file an adapter needs: that encoder's tensors, released names first."""
    wanted = encoder_by_id(encoder_id)
    kinds = [classify(path, name) for name, path in sorted(files.items())]
    fitting = [kind for kind in kinds if kind.kind == "encoder" and kind.encoder == wanted.id]
    if not fitting:  # a tower of another width under the encoder's released name: loading says what differs
        fitting = [kind for kind in kinds if kind.kind == "encoder" and kind.encoder is None
                   and name_rank(kind.name, wanted.file_stems) == 0]
    if fitting:
        return min(fitting, key=lambda kind: (name_rank(kind.name, wanted.file_stems), kind.name))
    found = "; ".join(f"{kind.name} is {kind.description}" for kind in kinds) or "no files"
    needed = wanted.name
    raise NotFound(f"'{adapter.name}' ({adapter.description}) needs {needed}; "
                   f"{', '.join(folders) or 'the clip_vision folders'} hold: {found}")


def model_table(adapters: dict[str, str], encoders: dict[str, str]) -> list[tuple[str, str, str, str, str]]:
    """(file, what it is, encoder it needs, presets it serves, whether that encoder is present) per file."""
    encoder_kinds = [classify(path, name) for name, path in sorted(encoders.items())]
    present = {kind.encoder for kind in encoder_kinds if kind.kind == "encoder"}
    rows = []
    for name, path in sorted(adapters.items()):
        kind = classify(path, name)
        needs = encoder_by_id(kind.encoder).name if kind.encoder else "-"
        rows.append((f"ipadapter/{name}", kind.description, needs, ", ".join(presets_served(kind)) or "-",
                     ("yes" if kind.encoder in present else "NO") if kind.kind == "adapter" else "-"))
    for kind in encoder_kinds:
        rows.append((f"clip_vision/{kind.name}", kind.description, "-", "-", "-"))
    return rows


def format_table(rows, header=("file", "what it is", "needs", "presets", "encoder present")) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def files_in(folders: list[str], extensions=(".safetensors", ".bin", ".pt", ".pth", ".ckpt")) -> dict[str, str]:
    """name (relative to its folder) -> path, for the weights files under some folders (the first folder wins)."""
    found = {}
    for folder in folders:
        for root, _, names in os.walk(folder, followlinks=True):
            for file_name in names:
                if file_name.lower().endswith(extensions):
                    path = os.path.join(root, file_name)
                    found.setdefault(os.path.relpath(path, folder).replace(os.sep, "/"), path)
    return found


def configured_folders(comfyui: Path, kind: str) -> list[str]:
    """A ComfyUI installation's folders of one kind ("ipadapter", "clip_vision"): ``models/<kind>`` and those its
    ``extra_model_paths.yaml`` names (each entry's paths, one per line, under its ``base_path``)."""
    import yaml

    folders = [comfyui / "models" / kind]
    config = comfyui / "extra_model_paths.yaml"
    if config.is_file():
        entries = yaml.safe_load(config.read_text()) or {}
        for entry in entries.values() if isinstance(entries, dict) else ():
            if not isinstance(entry, dict) or not isinstance(entry.get(kind), str):
                continue
            base = Path(os.path.expanduser(str(entry.get("base_path", ""))))
            base = base if base.is_absolute() else comfyui / base
            folders += [base / line.strip() for line in entry[kind].splitlines() if line.strip()]
    return [str(folder) for folder in folders if folder.is_dir()]
