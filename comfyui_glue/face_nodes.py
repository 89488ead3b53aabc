"""ComfyUI glue for the FaceID nodes: the insightface model folders, the face analysis the loaders give, the faces
of an IMAGE batch as embeds, and the LoRA the FaceID unified loader applies.

The face pipeline is ``ipadapter/faces.py``, the adapters ``ipadapter/faceid.py``, the LoRA patches
``comfyui_glue/faceid_lora.py``; this module only finds files and wires them together.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

from ..ipadapter.adapter_file import IPAdapterCheckpoint
from ..ipadapter.faceid import face_crop_size, faceid_embeds, find_lora_sidecar, variant_of
from ..ipadapter.faces import DETECTOR_PATTERNS, PACKS, RECOGNITION_PATTERNS, FaceAnalyzer, FaceError, find_pack
from ..ipadapter.image_prompt import EncodedImages
from ..ipadapter.registry import VARIANTS
from .faceid_lora import apply_adapter_lora, apply_lora_sidecar
from .interface import FACE_FOLDER, FACE_LORA, FACE_PROVIDERS

PROVIDERS = dict(zip(FACE_PROVIDERS, (None, ("CPU",), ("CUDA", "CPU"))))  # auto: CUDA when onnxruntime-gpu has it


def face_folders() -> list[str]:
    import folder_paths

    return list(folder_paths.get_folder_paths(FACE_FOLDER))


def list_packs() -> list[str]:
    """The pack folders holding .onnx files, in ``<folder>/models/`` (cubiq's layout) or ``<folder>/``; the
    released names when there are none, so the node still shows what it expects."""
    found = []
    for folder in face_folders():
        for root in (Path(folder) / "models", Path(folder)):
            if root.is_dir():
                found += [child.name for child in sorted(root.iterdir()) if child.is_dir() and any(child.glob("*.onnx"))]
    return list(dict.fromkeys(found)) or list(PACKS)


def load_face_analysis(pack: str, provider: str, detector_size: int) -> FaceAnalyzer:
    """The pack's analyzer from the first insightface folder that has it; cached across queues (with its per-image
    analysis) until a file of the pack changes."""
    if provider not in PROVIDERS:
        raise FaceError(f"face provider '{provider}' is unknown; expected one of {', '.join(PROVIDERS)}")
    folders = face_folders()
    for folder in folders:
        try:
            pack_folder = find_pack(Path(folder), pack)
        except FaceError:
            continue
        stamp = tuple((path.name, path.stat().st_mtime_ns) for path in sorted(pack_folder.glob("*.onnx")))
        return _analyzer(folder, pack, PROVIDERS[provider], detector_size, stamp)
    raise FaceError(f"no face model pack '{pack}' in {' or '.join(f'{f}/models' for f in folders) or 'models/insightface'}; "
                    f"expected a folder {pack}/ there with a detector ({' or '.join(DETECTOR_PATTERNS)}) and a "
                    f"recognition model ({' or '.join(RECOGNITION_PATTERNS)}); nothing is downloaded")


@functools.lru_cache(maxsize=4)
def _analyzer(folder: str, pack: str, providers, detector_size: int, stamp) -> FaceAnalyzer:
    return FaceAnalyzer(folder, pack, detector_size, list(providers) if providers else None)


def encode_faces(analysis: FaceAnalyzer, image, checkpoint: IPAdapterCheckpoint, shortcut_scale: float = 1.0,
                 clip: Callable[..., EncodedImages] | None = None):
    """The FaceID embeds of the largest face of each image, and the aligned crops; ``clip(crops)`` encodes the
    crops for the adapters that read them (faceid-plus, plusv2)."""
    spec = checkpoint.spec
    if not spec.takes_faces:
        offered = ", ".join(variant.name for variant in VARIANTS if variant.takes_faces)
        raise ValueError(f"'{checkpoint.source}' is {spec.describe()}, which takes image features, not faces; expected "
                         f"a FaceID adapter ({offered}) on Encode Face, or Encode Image for this one")
    if not isinstance(analysis, FaceAnalyzer):
        raise ValueError(f"face_analysis is {type(analysis).__name__}; expected the output of IP-Adapter Face "
                         "Analysis Loader")
    variant = variant_of(checkpoint)
    faces = analysis.embed_faces(image, crop_size=face_crop_size(variant, spec.architecture))
    encoded = None
    if spec.encoder_input == "penultimate":
        if clip is None:
            raise ValueError(f"'{checkpoint.source}' ({variant.name}) also shows the aligned face crop to "
                             f"{spec.encoder_name}; expected an image_encoder on Encode Face")
        encoded = clip(faces.crops)
    embeds = faceid_embeds(faces, encoded)
    embeds.shortcut_scale = float(shortcut_scale)
    return embeds, faces.crops


def with_faceid_lora(model, checkpoint: IPAdapterCheckpoint, adapter_path: str, choice: str, strength: float,
                     lora_folders=()):
    """``model`` with the adapter's LoRA: its ``_lora.safetensors`` sidecar (what ComfyUI's LoRA loader would
    apply, so both paths give the same model), else the LoRA in the adapter file; ``model`` itself for the
    adapters without a LoRA, for choice "none" and for strength 0."""
    if choice not in FACE_LORA:
        raise ValueError(f"lora choice '{choice}' is unknown; expected one of {', '.join(FACE_LORA)}")
    if choice != FACE_LORA[0] or not checkpoint.spec.lora_rank or strength == 0:
        return model
    sidecar = find_lora_sidecar(adapter_path, lora_folders)
    if sidecar is not None:
        return apply_lora_sidecar(model, sidecar, strength)
    return apply_adapter_lora(model, checkpoint, strength)
