"""The FaceID face pipeline (ipadapter/faces.py) end to end on a synthetic image, against a
reference written here from the published method: an InsightFace pack built at run time
(devtools/face_models.py: an SCRFD det_10g look-alike that places known faces, a small ArcFace
network with random weights), the faces detected, aligned to the ArcFace template by the
5-point similarity transform (Umeyama) and embedded; then the one-line errors."""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import onnxruntime
import pytest
import torch

from devtools.comfy_import import REPO_ROOT
from devtools.face_models import (ARCFACE_TEMPLATE, face_from_template, letterbox_scale, wrong_detector_model,
                                  write_face_pack, write_model)
from ipadapter.faces import FaceAnalyzer, FaceError, default_providers, find_pack

HEIGHT, WIDTH, DETECTOR = 800, 600, 640
SCALE = letterbox_scale(HEIGHT, WIDTH, DETECTOR)  # 0.8: the image is 640 x 480 in the detector
# In image pixels: a large face with a lower score, a small one with a higher score.
LARGE = {"centre": (330.0, 420.0), "eye_distance": 120.0, "angle_degrees": 12.0, "score": 0.8, "stride": 32}
SMALL = {"centre": (120.0, 140.0), "eye_distance": 40.0, "angle_degrees": -8.0, "score": 0.95, "stride": 16}


def planted(face: dict):
    """The face as the detector places it (detector pixels) and as it is in the image (image pixels)."""
    in_detector = face_from_template((face["centre"][0] * SCALE, face["centre"][1] * SCALE), face["eye_distance"] * SCALE,
                                     face["angle_degrees"], score=face["score"], stride=face["stride"])
    in_image = face_from_template(face["centre"], face["eye_distance"], face["angle_degrees"])
    return in_detector, in_image


def textured(seed: int, low: int = 90, high: int = 256) -> np.ndarray:
    """A bright noisy RGB image (the detector's gate opens on bright cells), smoothed a little."""
    rng = np.random.default_rng(seed)
    image = rng.integers(low, high, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    return cv2.GaussianBlur(image, (5, 5), 1.0)


@pytest.fixture(scope="module")
def face_pack(tmp_path_factory):
    """ComfyUI's layout: models/insightface/models/buffalo_l (the root cubiq passes is models/insightface)."""
    root = tmp_path_factory.mktemp("faces") / "insightface"
    write_face_pack(root / "models", [planted(LARGE)[0], planted(SMALL)[0]])
    return root


@pytest.fixture(scope="module")
def analyzer(face_pack):
    import insightface.app.face_analysis
    import insightface.model_zoo.model_zoo
    import insightface.utils.storage

    def refuse(*args, **kwargs):
        raise AssertionError("insightface's model loading or download path ran")

    with pytest.MonkeyPatch.context() as patch:  # the paths that download what is missing must never run
        patch.setattr(insightface.utils.storage, "download_file", refuse)
        patch.setattr(insightface.model_zoo.model_zoo, "download_onnx", refuse)
        patch.setattr(insightface.model_zoo.model_zoo, "get_model", refuse)
        patch.setattr(insightface.app.face_analysis.FaceAnalysis, "__init__", refuse)
        yield FaceAnalyzer(face_pack, "buffalo_l", detector_size=DETECTOR, providers=["CPU"])


# --- the reference, from the method -------------------------------------------------------------

def umeyama(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The least-squares similarity transform source -> target (Umeyama 1991), as a 2 x 3 matrix."""
    source, target = source.astype(np.float64), target.astype(np.float64)
    mean_s, mean_t = source.mean(0), target.mean(0)
    centred_s, centred_t = source - mean_s, target - mean_t
    covariance = centred_t.T @ centred_s / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.ones(2)
    if np.linalg.det(covariance) < 0:
        signs[-1] = -1
    rotation = u @ np.diag(signs) @ vt
    scale = (singular * signs).sum() / centred_s.var(0).sum()
    return np.hstack([scale * rotation, (mean_t - scale * rotation @ mean_s)[:, None]])


def template(size: int) -> np.ndarray:
    """The ArcFace template for a size x size crop: scaled from 112, or (sizes of 128) from 128 and shifted 8 right."""
    if size % 112 == 0:
        return ARCFACE_TEMPLATE * size / 112
    points = ARCFACE_TEMPLATE * size / 128
    points[:, 0] += 8 * size / 128
    return points


def reference_crop(image: np.ndarray, landmarks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    matrix = umeyama(landmarks, template(size))
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0), matrix


def reference_embedding(pack_folder, crop112: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(pack_folder / "w600k_r50.onnx"), providers=["CPUExecutionProvider"])
    blob = ((crop112.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    raw = session.run(None, {"input.1": blob})[0][0]
    return raw / np.linalg.norm(raw)


def assert_crop(ours: np.ndarray, reference: np.ndarray):
    """Equal but for a rare one-level difference (the affine matrices differ in the last bits)."""
    assert ours.shape == reference.shape and ours.dtype == np.uint8
    difference = np.abs(ours.astype(int) - reference.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and text
    return text


# --- the pipeline -------------------------------------------------------------------------------

def test_reference_alignment_maps_the_landmarks_onto_the_template():
    """The reference itself: a face that is the template turned, scaled and moved is brought back exactly."""
    for face in (LARGE, SMALL):
        landmarks = np.asarray(planted(face)[1].landmarks)
        for size in (112, 224, 256):
            matrix = umeyama(landmarks, template(size))
            np.testing.assert_allclose(np.c_[landmarks, np.ones(5)] @ matrix.T, template(size), atol=1e-9)
            eyes = np.linalg.norm(template(size)[1] - template(size)[0])
            assert np.hypot(*matrix[:, 0]) == pytest.approx(eyes / face["eye_distance"])
            assert np.degrees(np.arctan2(matrix[1, 0], matrix[0, 0])) == pytest.approx(-face["angle_degrees"])


def test_detect_align_crop_embed(analyzer, face_pack):
    image = textured(0)
    faces = analyzer.analyze(image)
    assert [round(face.score, 4) for face in faces] == [SMALL["score"], LARGE["score"]]  # highest score first
    pack_folder = face_pack / "models" / "buffalo_l"
    for face, spec in zip(faces, (SMALL, LARGE)):
        in_image = planted(spec)[1]
        np.testing.assert_allclose(face.box, in_image.box, atol=2e-3)
        np.testing.assert_allclose(face.landmarks, in_image.landmarks, atol=2e-3)
        assert face.box.dtype == face.landmarks.dtype == face.embedding.dtype == np.float32

        crop, _ = reference_crop(image, np.asarray(in_image.landmarks), 224)
        assert_crop(face.crop, crop)
        crop112, _ = reference_crop(image, np.asarray(in_image.landmarks), 112)
        expected = reference_embedding(pack_folder, crop112)
        assert face.embedding.shape == (512,)
        np.testing.assert_allclose(face.embedding, expected, atol=2e-4)
        assert np.linalg.norm(face.embedding) == pytest.approx(1, abs=1e-5) and face.embedding_norm > 0
        np.testing.assert_allclose(face.raw_embedding / face.embedding_norm, face.embedding, atol=1e-7)

    # The two faces' crops differ, and so do their embeddings.
    assert float(faces[0].embedding @ faces[1].embedding) < 0.99

    # SDXL's 256 crop: the template from 128, shifted.
    large256 = next(face for face in analyzer.analyze(image, crop_size=256) if face.score < 0.9)
    assert_crop(large256.crop, reference_crop(image, np.asarray(planted(LARGE)[1].landmarks), 256)[0])
    # Floats in 0..1 are the same pixels.
    floats = analyzer.analyze(image.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(floats[1].crop, faces[1].crop)


def test_analyze_is_cached_per_image_and_settings(analyzer, monkeypatch):
    calls = []
    detect = analyzer._detector.detect
    monkeypatch.setattr(analyzer._detector, "detect", lambda *a, **k: calls.append(k["input_size"]) or detect(*a, **k))
    image = textured(5)
    first = analyzer.analyze(image)
    again = analyzer.analyze(image.copy())
    assert [id(face) for face in first] == [id(face) for face in again] and calls == [(640, 640)]
    analyzer.analyze(image, detector_size=512)
    analyzer.analyze(textured(6))
    assert calls == [(640, 640), (512, 512), (640, 640)]
    with pytest.raises(ValueError):
        first[0].embedding[0] = 1  # cached arrays are read-only


def test_embed_faces_picks_the_largest_face_per_image(analyzer):
    images = np.stack([textured(1), textured(2)])
    embeds = analyzer.embed_faces(torch.from_numpy(images).float() / 255.0)
    assert embeds.embeds.shape == (2, 512) and embeds.crops.shape == (2, 224, 224, 3)
    assert embeds.detector_sizes == (640, 640)
    for index in range(2):
        large = next(face for face in analyzer.analyze(images[index]) if face.score < 0.9)
        torch.testing.assert_close(embeds.embeds[index], torch.tensor(large.embedding))
        torch.testing.assert_close(embeds.crops[index], torch.tensor(large.crop).float() / 255.0)
        torch.testing.assert_close(embeds.boxes[index], torch.from_numpy(np.asarray(planted(LARGE)[1].box, np.float32)),
                                   atol=2e-3, rtol=0)
    assert embeds.scores.tolist() == pytest.approx([LARGE["score"]] * 2, abs=1e-4)
    assert float(embeds.embeds[0] @ embeds.embeds[1]) < 0.99  # other pixels, other embedding
    torch.testing.assert_close(embeds.raw_embeds / embeds.norms[:, None], embeds.embeds)
    assert analyzer.embed_faces(torch.from_numpy(images[:1]).float() / 255.0, crop_size=256).crops.shape == (1, 256, 256, 3)


# --- the one-line errors ------------------------------------------------------------------------

def test_no_face_names_the_image(analyzer):
    dark = textured(3, 0, 30)
    batch = torch.from_numpy(np.stack([textured(4), dark])).float() / 255.0
    with pytest.raises(FaceError) as error:
        analyzer.embed_faces(batch)
    assert "no face found in image 1 of the batch of 2" in one_line(error)
    assert "detector sizes 640 down to 320" in str(error.value)
    assert analyzer.analyze(dark) == []


def test_pack_without_recognition_model(tmp_path):
    pack = write_face_pack(tmp_path, [planted(LARGE)[0]], recognition_name=None)
    with pytest.raises(FaceError) as error:
        FaceAnalyzer(tmp_path, "buffalo_l", providers=["CPU"])
    text = one_line(error)
    assert str(pack) in text and "w600k*.onnx" in text and "glintr*.onnx" in text


def test_detector_with_the_wrong_signature(tmp_path):
    pack = write_face_pack(tmp_path, [planted(LARGE)[0]])
    write_model(wrong_detector_model(), pack / "det_10g.onnx")
    with pytest.raises(FaceError) as error:
        FaceAnalyzer(tmp_path, "buffalo_l", providers=["CPU"])
    text = one_line(error)
    assert "det_10g.onnx' is not an SCRFD face detector" in text and "2 output(s)" in text


def test_folders_settings_and_providers(tmp_path, face_pack):
    assert find_pack(face_pack, "buffalo_l") == find_pack(face_pack / "models", "buffalo_l")
    with pytest.raises(FaceError) as error:
        find_pack(face_pack, "antelopev2")
    assert "no face model pack 'antelopev2'" in one_line(error)
    with pytest.raises(FaceError) as error:
        FaceAnalyzer(face_pack, "../buffalo_l")
    one_line(error)
    with pytest.raises(FaceError) as error:
        FaceAnalyzer(face_pack, providers=["NoSuch"])
    assert "NoSuchExecutionProvider" in one_line(error)
    with pytest.raises(FaceError) as error:
        FaceAnalyzer(face_pack, crop_size=300)
    one_line(error)
    with pytest.raises(FaceError) as error:
        FaceAnalyzer(face_pack, detector_size=600)
    one_line(error)
    assert default_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CUDAExecutionProvider",
                                                                                   "CPUExecutionProvider"]
    assert default_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_bad_images(analyzer):
    with pytest.raises(FaceError) as error:
        analyzer.analyze(np.zeros((32, 32), np.uint8))
    one_line(error)
    with pytest.raises(FaceError) as error:
        analyzer.embed_faces(torch.zeros(0, 64, 64, 3))
    one_line(error)


def test_without_insightface(face_pack):
    code = (
        "import sys; sys.modules['insightface'] = None\n"
        "from ipadapter.faces import FaceAnalyzer, FaceError\n"
        "try:\n"
        f"    FaceAnalyzer({str(face_pack)!r})\n"
        "except FaceError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "insightface >= 2.1" in lines[0]
    assert 'pip install "insightface>=2.1" onnxruntime' in lines[0] and 'pip install ".[faceid]"' in lines[0]


def test_old_insightface(face_pack):
    """insightface 0.7.3 (what cubiq's users often have) is refused with the upgrade command."""
    code = (
        "import sys, types\n"
        "old = types.ModuleType('insightface'); old.__version__ = '0.7.3'\n"
        "old.model_zoo = types.ModuleType('insightface.model_zoo'); old.utils = types.ModuleType('insightface.utils')\n"
        "old.utils.face_align = types.ModuleType('insightface.utils.face_align')\n"
        "sys.modules.update({'insightface': old, 'insightface.model_zoo': old.model_zoo, 'insightface.utils': old.utils,\n"
        "                    'insightface.utils.face_align': old.utils.face_align})\n"
        "from ipadapter.faces import FaceAnalyzer, FaceError\n"
        "try:\n"
        f"    FaceAnalyzer({str(face_pack)!r})\n"
        "except FaceError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "insightface 0.7.3 is installed" in lines[0] and 'pip install -U "insightface>=2.1"' in lines[0]
