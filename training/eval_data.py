"""Evaluation references (image + caption) and the files of already generated images.

Sources:
- COCO-2017 val as users have it: a folder holding ``annotations/captions_val2017.json`` and
  ``val2017/``, or the captions JSON itself (images in ``val2017/`` next to its folder, or
  ``images_dir``). Images are taken in order of image id; each one's caption is its first
  (lowest annotation id) of COCO's five.
- the trainer's JSONL/CSV manifests and image folders with ``.txt`` captions, read with
  ``training.data``'s readers (rows in file order, sorted paths for folders).

Generated images are named ``<reference key>_<k>.<png|jpg|jpeg|webp>`` with k = 0..K-1, the
key being the reference image's file name without extension (``000000000139_0.png``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .data import DataError, read_folder, read_manifest
from .errors import UserError

COCO_CAPTIONS = Path("annotations") / "captions_val2017.json"
COCO_IMAGES = "val2017"
GENERATED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class EvalError(UserError):
    """Evaluation inputs that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Reference:
    key: str  # the image's file stem; names the generated files
    image: str
    caption: str


def load_references(path: str | Path, limit: int | None = None, images_dir: str | Path | None = None) -> tuple[list[Reference], str]:
    """The first ``limit`` references of a source, every image file checked; and a description."""
    location = Path(path).expanduser()
    if not location.exists():
        raise EvalError(f"reference data '{location}' does not exist; expected a COCO-2017 folder (annotations/ + val2017/), "
                        "its captions_val2017.json, a .jsonl/.csv manifest or a folder of images with .txt captions")
    if location.is_dir() and ((location / "annotations").is_dir() or (location / COCO_IMAGES).is_dir()):
        captions = location / COCO_CAPTIONS
        if not captions.is_file():
            raise EvalError(f"COCO folder '{location}' has no {COCO_CAPTIONS}; expected COCO-2017 val "
                            f"(annotations/captions_val2017.json from annotations_trainval2017.zip, and val2017/)")
        pairs, kind = _coco(captions, Path(images_dir) if images_dir else location / COCO_IMAGES), "COCO"
    elif location.is_file() and location.suffix.lower() == ".json" and _is_coco(location):
        default = location.parent.parent / COCO_IMAGES
        pairs, kind = _coco(location, Path(images_dir) if images_dir else default), "COCO"
    else:
        try:
            if location.is_dir():
                found, _ = read_folder(location)
                kind = "folder"
            else:
                found, _ = read_manifest(location)
                kind = "manifest"
        except DataError as error:
            raise EvalError(str(error)) from None
        pairs = [(pair.image, pair.caption) for pair in found]
    if limit is not None:
        pairs = pairs[:limit]
    references = [Reference(Path(image).stem, image, caption) for image, caption in pairs]
    _check(references, location)
    return references, f"{len(references)} {kind} references from {location}"


def _is_coco(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    return '"images"' in head or '"info"' in head or '"annotations"' in head


def _coco(captions_file: Path, images_dir: Path) -> list[tuple[str, str]]:
    try:
        data = json.loads(captions_file.read_text(encoding="utf-8"))
        images = {int(image["id"]): image["file_name"] for image in data["images"]}
        annotations = sorted(data["annotations"], key=lambda a: int(a["id"]))
        first: dict[int, str] = {}
        for annotation in annotations:
            caption = str(annotation.get("caption") or "").strip()
            if caption and int(annotation["image_id"]) not in first:
                first[int(annotation["image_id"])] = caption
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise EvalError(f"COCO captions '{captions_file}' are not readable ({type(error).__name__}: {str(error)[:80]}); "
                        "expected captions_val2017.json with 'images' and 'annotations'") from None
    if not first:
        raise EvalError(f"COCO captions '{captions_file}' hold no captioned images; expected captions_val2017.json")
    if not images_dir.is_dir():
        raise EvalError(f"COCO images folder '{images_dir}' does not exist; expected val2017/ next to annotations/ "
                        "(or pass --images)")
    return [(str(images_dir / images[i]), first[i]) for i in sorted(first) if i in images]


def _check(references: list[Reference], source: Path) -> None:
    if not references:
        raise EvalError(f"'{source}' gives no references; expected at least one image with a caption")
    missing = [r.image for r in references if not Path(r.image).is_file()]
    if missing:
        raise EvalError(f"{len(missing)} of the {len(references)} reference images do not exist (first: '{missing[0]}'); "
                        "expected every selected image file")
    seen: dict[str, str] = {}
    for reference in references:
        if reference.key in seen:
            raise EvalError(f"references '{seen[reference.key]}' and '{reference.image}' share the file name "
                            f"'{reference.key}'; generated images are named <name>_<k>.png, so names must be unique")
        seen[reference.key] = reference.image


def generated_files(folder: str | Path, references: list[Reference], samples: int) -> list[list[Path]]:
    """``<key>_<k>.<ext>`` for every reference and k < ``samples``; one-line error if any is missing."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise EvalError(f"generated images folder '{folder}' does not exist; expected <reference name>_<k>.png files")
    present = {p.name: p for p in folder.iterdir() if p.suffix.lower() in GENERATED_EXTENSIONS}
    files, missing = [], []
    for reference in references:
        row = []
        for k in range(samples):
            stem = f"{reference.key}_{k}"
            match = next((present[stem + e] for e in GENERATED_EXTENSIONS if stem + e in present), None)
            if match is None:
                missing.append(stem)
            row.append(match)
        files.append(row)
    if missing:
        raise EvalError(f"generated folder '{folder}' lacks {len(missing)} of {len(references) * samples} images "
                        f"(first: {missing[0]}.png for reference '{missing[0].rsplit('_', 1)[0]}'); expected "
                        f"{samples} per reference named <reference name>_<k>.png (or .jpg/.webp), k = 0..{samples - 1}")
    return files
