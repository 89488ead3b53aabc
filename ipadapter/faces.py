"""Face analysis for the FaceID adapters, through InsightFace >= 2.1 (imported when first needed).

What cubiq's ComfyUI_IPAdapter_plus does with ``FaceAnalysis``, on the model packs its users
have (``ComfyUI/models/insightface/models/buffalo_l`` or ``antelopev2``), with nothing ever
downloaded: the SCRFD detector (``det_*.onnx`` / ``scrfd*.onnx``) finds the faces and their five
landmarks, the ArcFace recognition model (``w600k*.onnx`` / ``glintr*.onnx``) embeds the
112 x 112 crop aligned to the ArcFace template, and the same alignment at 224 (SD1.5), 256
(SDXL) or 336 pixels gives the crop the FaceID Plus adapters show to CLIP. The landmark and
gender/age models of a pack are not loaded.

* ``FaceAnalyzer(model_folder, pack, detector_size, providers, crop_size)``: the two models of
  ``<model_folder>/<pack>/`` (or ``<model_folder>/models/<pack>/``, the ``root`` cubiq passes);
* ``FaceAnalyzer.analyze(image)``: every face of one RGB image (uint8, or floats in 0..1, [H, W, 3]),
  as ``Face`` records in the detector's order (highest score first), cached per image and settings;
* ``FaceAnalyzer.embed_faces(images)``: the largest face of each image of a [B, H, W, 3] batch
  (ComfyUI's IMAGE) as ``FaceEmbeds`` (torch tensors), the detector size lowered step by step as
  cubiq does when an image shows no face at the first size.

Every error is a ``FaceError`` with a one-line reason. No ComfyUI import: the nodes wrap this.
"""
from __future__ import annotations

import hashlib
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .files import first_line

MIN_INSIGHTFACE = (2, 1)
INSTALL_HINT = 'pip install "insightface>=2.1" onnxruntime (or, in this pack\'s folder: pip install ".[faceid]")'
DETECTOR_PATTERNS = ("det_*.onnx", "scrfd*.onnx")
RECOGNITION_PATTERNS = ("w600k*.onnx", "glintr*.onnx")
PACKS = ("buffalo_l", "antelopev2")  # the packs cubiq's loader offers; any folder name works
DEFAULT_CROP_SIZE = 224  # the aligned face crop for CLIP; a family may want another (cubiq takes 256 for SDXL)
DETECTOR_SIZE = 640
SMALLEST_RETRY_SIZE = 320  # cubiq: range(640, 256, -64)
RETRY_STEP = 64
EMBEDDING_WIDTH = 512


class FaceError(ValueError):
    """A one-line reason the faces could not be found or embedded."""


@dataclass(frozen=True, eq=False)  # arrays inside: identity, not element-wise, equality
class Face:
    """One detected face. ``box`` (x1, y1, x2, y2) and ``landmarks`` [5, 2] (eyes, nose tip,
    mouth corners) are image pixels; ``embedding`` is the L2-normalised ArcFace embedding [512]
    (InsightFace's ``normed_embedding``), ``embedding_norm`` the raw one's length (the raw
    embedding, which cubiq's "portrait unnorm" preset uses, is their product); ``crop`` is the
    RGB uint8 face aligned to the ArcFace template at the analyzer's crop size."""
    box: np.ndarray
    landmarks: np.ndarray
    score: float
    embedding: np.ndarray
    embedding_norm: float
    crop: np.ndarray

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))

    @property
    def raw_embedding(self) -> np.ndarray:
        return self.embedding * self.embedding_norm


@dataclass(frozen=True, eq=False)  # arrays inside: identity, not element-wise, equality
class FaceEmbeds:
    """The largest face of each image of a batch: ``embeds`` [B, 512] normalised (float32),
    ``norms`` [B] their raw lengths, ``crops`` [B, S, S, 3] in 0..1 (ComfyUI's IMAGE, for CLIP),
    ``boxes`` [B, 4], ``landmarks`` [B, 5, 2], ``scores`` [B], and the detector size each face
    was found at."""
    embeds: Any
    norms: Any
    crops: Any
    boxes: Any
    landmarks: Any
    scores: Any
    detector_sizes: tuple[int, ...]

    @property
    def raw_embeds(self):
        return self.embeds * self.norms[:, None]


def _insightface():
    """insightface's ``model_zoo``, ``face_align`` and onnxruntime, or a one-line FaceError."""
    try:
        import insightface
        import onnxruntime
        from insightface import model_zoo
        from insightface.utils import face_align
    except ImportError as reason:
        raise FaceError(f"FaceID needs insightface >= 2.1 and onnxruntime, which cannot be imported here "
                        f"({first_line(reason)}); install them: {INSTALL_HINT}") from None
    version = getattr(insightface, "__version__", "0")
    if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < MIN_INSIGHTFACE:
        raise FaceError(f"insightface {version} is installed; FaceID here needs insightface >= 2.1: "
                        f'pip install -U "insightface>=2.1" onnxruntime')
    return model_zoo, face_align, onnxruntime


def default_providers(available: list[str]) -> list[str]:
    """CUDA when this onnxruntime offers it (onnxruntime-gpu), else the CPU."""
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _provider_names(requested: list[str], available: list[str]) -> list[str]:
    names = [name if name.endswith("ExecutionProvider") else f"{name}ExecutionProvider" for name in requested]
    missing = [name for name in names if name not in available]
    if not names or missing:
        raise FaceError(f"onnxruntime here has no {', '.join(missing) or 'provider in []'}; "
                        f"it offers {', '.join(available)}")
    return names


def _find(folder: Path, patterns: tuple[str, ...]) -> Path | None:
    for pattern in patterns:
        found = sorted(path for path in folder.glob(pattern) if path.is_file())
        if found:
            return found[0]
    return None


def find_pack(model_folder: Path, pack: str) -> Path:
    """``<model_folder>/<pack>``, or ``<model_folder>/models/<pack>`` (InsightFace's ``root``)."""
    if not pack or Path(pack).name != pack or pack in (".", ".."):
        raise FaceError(f"face model pack '{pack}' is not a folder name; expected one like {' or '.join(PACKS)}")
    folder = Path(model_folder)
    for candidate in (folder / pack, folder / "models" / pack):
        if candidate.is_dir():
            return candidate
    raise FaceError(f"no face model pack '{pack}' in '{folder}' (nor in '{folder / 'models'}'); expected "
                    f"ComfyUI/models/insightface/models/{pack}/ with the detector and recognition .onnx files")


def _shape(values) -> str:
    return ", ".join(f"{value.name}{list(value.shape)}" for value in values)


def _is_size(value, expected=None) -> bool:
    return isinstance(value, int) and (expected is None or value == expected)


def check_detector(session, path: Path) -> int:
    """The number of strides of an SCRFD detector with landmarks (3 or 5), or a one-line FaceError."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    strides = {9: 3, 15: 5}.get(len(outputs))
    good = (len(inputs) == 1 and len(inputs[0].shape) == 4 and inputs[0].shape[1] == 3 and strides is not None
            and inputs[0].type == "tensor(float)")
    if good:
        for index, output in enumerate(outputs):
            width = (1, 4, 10)[index // strides]
            shape = list(output.shape)
            if len(shape) not in (2, 3) or (isinstance(shape[-1], int) and shape[-1] != width):
                good = False
    if not good:
        raise FaceError(
            f"'{path}' is not an SCRFD face detector with landmarks: it maps {_shape(inputs)} to {len(outputs)} "
            f"output(s) ({_shape(outputs)}); expected one [1, 3, H, W] image and 9 outputs: scores [N, 1], "
            f"boxes [N, 4] and 5 landmarks [N, 10] at strides 8, 16, 32 (like det_10g.onnx)")
    return strides


def check_recognition(session, path: Path) -> int:
    """The crop size of an ArcFace recognition model ([N, 3, S, S] -> [N, 512]), or a one-line FaceError."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    good = (len(shape) == 4 and shape[1] == 3 and _is_size(shape[2]) and shape[2] == shape[3] and shape[2] >= 112
            and shape[2] % 16 == 0 and len(outputs) == 1 and _is_size(list(outputs[0].shape)[-1], EMBEDDING_WIDTH))
    if not good:
        raise FaceError(f"'{path}' is not an ArcFace face recognition model: it maps {_shape(inputs)} to "
                        f"{_shape(outputs)}; expected [N, 3, 112, 112] -> [N, {EMBEDDING_WIDTH}] (like w600k_r50.onnx)")
    return shape[2]


def check_crop_size(size: int) -> int:
    if not isinstance(size, int) or size <= 0 or (size % 112 and size % 128):
        raise FaceError(f"face crop size {size} is not a multiple of 112 or 128; expected "
                        f"224 (SD1.5), 256 (SDXL) or 336 (Kolors)")
    return size


def check_detector_size(size: int) -> int:
    if not isinstance(size, int) or size < 64 or size % 32:
        raise FaceError(f"detector size {size} is not a multiple of 32 from 64; expected 640 (or down to 320)")
    return size


def as_rgb_uint8(image, what: str = "the image") -> np.ndarray:
    """[H, W, 3] RGB uint8 from uint8 or 0..1 floats (numpy or torch); floats become bytes as
    ComfyUI and cubiq make them (times 255, clipped, truncated)."""
    if hasattr(image, "detach"):
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
        raise FaceError(f"{what} has shape {list(image.shape)}; expected [height, width, 3] RGB")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if not np.issubdtype(image.dtype, np.floating):
        raise FaceError(f"{what} is {image.dtype}; expected uint8 pixels or floats in 0..1")
    return np.ascontiguousarray(np.clip(image.astype(np.float32) * 255.0, 0, 255).astype(np.uint8))


class FaceAnalyzer:
    """The detector and recognition models of one InsightFace pack, on ``providers`` (default:
    CUDA when onnxruntime-gpu offers it, else the CPU; "CUDA" means "CUDAExecutionProvider")."""

    def __init__(self, model_folder: str | Path, pack: str = "buffalo_l", detector_size: int = DETECTOR_SIZE,
                 providers: list[str] | None = None, crop_size: int = DEFAULT_CROP_SIZE, threshold: float = 0.5,
                 cache_size: int = 32):
        self.folder = find_pack(Path(model_folder), pack)
        self.pack = pack
        self.detector_size = check_detector_size(detector_size)
        self.crop_size = check_crop_size(crop_size)
        if not 0 < threshold < 1:
            raise FaceError(f"detection threshold {threshold} is outside 0..1; expected about 0.5")
        self.threshold = float(threshold)
        self.detector_file = _find(self.folder, DETECTOR_PATTERNS)
        if self.detector_file is None:
            raise FaceError(f"no face detector in '{self.folder}': no file matches {' or '.join(DETECTOR_PATTERNS)} "
                            f"(buffalo_l has det_10g.onnx)")
        self.recognition_file = _find(self.folder, RECOGNITION_PATTERNS)
        if self.recognition_file is None:
            raise FaceError(f"no face recognition model in '{self.folder}': no file matches "
                            f"{' or '.join(RECOGNITION_PATTERNS)} (buffalo_l has w600k_r50.onnx, antelopev2 glintr100.onnx)")

        model_zoo, self._face_align, onnxruntime = _insightface()
        available = list(onnxruntime.get_available_providers())
        self.providers = default_providers(available) if providers is None else _provider_names(list(providers), available)
        model_zoo.preload_cuda_libraries(self.providers)  # onnxruntime-gpu finds pip's CUDA libraries
        detector_session = self._session(onnxruntime, self.detector_file)
        check_detector(detector_session, self.detector_file)
        recognition_session = self._session(onnxruntime, self.recognition_file)
        self.recognition_size = check_recognition(recognition_session, self.recognition_file)
        # Built on our sessions: insightface's routers and FaceAnalysis (which download what is
        # missing) never run. One dynamic detector session serves every size, as insightface < 2 did.
        self._detector = model_zoo.SCRFD(model_file=str(self.detector_file), session=detector_session,
                                         static_shape_sessions=False)
        self._recognizer = model_zoo.ArcFaceONNX(model_file=str(self.recognition_file), session=recognition_session)
        self._cache: OrderedDict[tuple, list[Face]] = OrderedDict()
        self._cache_size = cache_size

    def _session(self, onnxruntime, path: Path):
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        try:
            return onnxruntime.InferenceSession(str(path), sess_options=options, providers=self.providers)
        except Exception as reason:  # noqa: BLE001 (onnxruntime raises its own types for unreadable or invalid files)
            raise FaceError(f"onnxruntime cannot load '{path}' ({first_line(reason)}); "
                            f"expected the ONNX file of an InsightFace pack") from None

    def __repr__(self) -> str:
        return (f"FaceAnalyzer('{self.folder}', detector={self.detector_file.name}, "
                f"recognition={self.recognition_file.name}, providers={self.providers})")

    def analyze(self, image, detector_size: int | None = None, crop_size: int | None = None) -> list[Face]:
        """Every face of one RGB image ([H, W, 3] uint8, or floats in 0..1), highest score first."""
        rgb = as_rgb_uint8(image)
        detector_size = check_detector_size(detector_size or self.detector_size)
        crop_size = check_crop_size(crop_size or self.crop_size)
        key = (hashlib.blake2b(rgb.tobytes(), digest_size=16).hexdigest(), rgb.shape, detector_size, crop_size)
        if key in self._cache:
            self._cache.move_to_end(key)
            return list(self._cache[key])
        faces = self._analyze(rgb, detector_size, crop_size)
        self._cache[key] = faces
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return list(faces)

    def _analyze(self, rgb: np.ndarray, detector_size: int, crop_size: int) -> list[Face]:
        bgr = np.ascontiguousarray(rgb[..., ::-1])  # insightface reads OpenCV's BGR order
        boxes, landmarks = self._detector.detect(bgr, input_size=(detector_size, detector_size),
                                                 det_thresh=self.threshold)
        if boxes.shape[0] == 0:
            return []
        with warnings.catch_warnings():  # scikit-image >= 0.26 deprecates the estimate() that norm_crop calls
            warnings.simplefilter("ignore", FutureWarning)
            align = self._face_align.norm_crop
            aligned = [align(bgr, landmark=points, image_size=self.recognition_size) for points in landmarks]
            crops = [align(rgb, landmark=points, image_size=crop_size) for points in landmarks]
        raw = np.asarray(self._recognizer.get_feat(aligned), dtype=np.float32).reshape(len(aligned), -1)
        norms = np.linalg.norm(raw, axis=1)
        faces = []
        for index, crop in enumerate(crops):
            arrays = [boxes[index, :4].astype(np.float32), landmarks[index].astype(np.float32),
                      (raw[index] / max(norms[index], 1e-12)).astype(np.float32), np.ascontiguousarray(crop)]
            for array in arrays:
                array.flags.writeable = False  # cached: shared by every caller
            faces.append(Face(box=arrays[0], landmarks=arrays[1], score=float(boxes[index, 4]), embedding=arrays[2],
                              embedding_norm=float(norms[index]), crop=arrays[3]))
        return faces

    def detector_sizes(self, retry_smaller: bool = True) -> list[int]:
        """The sizes ``embed_faces`` tries: the analyzer's, then (cubiq's fallback) 64 less each time down to 320."""
        if not retry_smaller:
            return [self.detector_size]
        return [self.detector_size] + list(range(self.detector_size - RETRY_STEP, SMALLEST_RETRY_SIZE - 1, -RETRY_STEP))

    def embed_faces(self, images, crop_size: int | None = None, retry_smaller: bool = True) -> FaceEmbeds:
        """The largest face of each image of ``images`` ([B, H, W, 3] floats in 0..1, ComfyUI's IMAGE)."""
        import torch

        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != 3:
            shape = list(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise FaceError(f"images are {shape}; expected a [batch, height, width, 3] tensor in 0..1")
        if images.shape[0] == 0:
            raise FaceError("the image batch is empty; expected at least one image with a face")
        crop_size = check_crop_size(crop_size or self.crop_size)
        sizes = self.detector_sizes(retry_smaller)
        chosen, found_at = [], []
        for index in range(images.shape[0]):
            rgb = as_rgb_uint8(images[index], f"image {index}")
            for size in sizes:
                faces = self.analyze(rgb, detector_size=size, crop_size=crop_size)
                if faces:
                    chosen.append(max(faces, key=lambda face: face.area))  # the first of equals: the best score
                    found_at.append(size)
                    break
            else:
                tried = f"detector size {sizes[0]}" if len(sizes) == 1 else f"detector sizes {sizes[0]} down to {sizes[-1]}"
                raise FaceError(f"no face found in image {index} of the batch of {images.shape[0]} ({tried}); "
                                f"expected an image where a face is clearly visible")

        def stack(name: str):
            return torch.from_numpy(np.stack([getattr(face, name) for face in chosen]))

        return FaceEmbeds(
            embeds=stack("embedding"), norms=torch.tensor([face.embedding_norm for face in chosen], dtype=torch.float32),
            crops=stack("crop").float() / 255.0, boxes=stack("box"), landmarks=stack("landmarks"),
            scores=torch.tensor([face.score for face in chosen], dtype=torch.float32), detector_sizes=tuple(found_at))
