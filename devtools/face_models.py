"""InsightFace model packs built at run time: ONNX files with the input and output signatures of
the released ``buffalo_l`` models, for the FaceID tests (nothing is downloaded).

* ``detector_model``: an SCRFD ``det_10g.onnx`` look-alike. One input ``input.1`` [1, 3, ?, ?]
  (normalised RGB, ``(pixel - 127.5) / 128``); nine outputs, in SCRFD's order: the scores
  [anchors, 1] at strides 8, 16, 32, then the box distances [anchors, 4], then the five
  landmark offsets [anchors, 10], both in units of the stride, for 2 anchors per cell (a
  cell's anchors are rows ``(row * width + column) * 2 + anchor``). The graph places the faces
  it is given (``PlantedFace``: box and landmarks in detector-input pixels) on one anchor
  each, whatever the input size (a face whose anchor is outside a smaller input's grid is not
  there); a face's score is its ``score`` times a gate on the brightness of that anchor's cell
  (the mean of the three channels through a steep sigmoid), so a dark image (or the black
  letterbox) has no face.
* ``recognition_model``: an ArcFace ``w600k_r50.onnx`` look-alike: ``input.1`` [N, 3, 112, 112]
  (``(pixel - 127.5) / 127.5``, RGB) -> [N, 512], a small real network (two strided
  convolutions, flatten, a linear layer) with random weights, so embeddings differ per crop.
* ``wrong_detector_model``: a file named like a detector with another signature;
* ``face_from_template``: a face whose landmarks are the ArcFace template turned, scaled and moved;
* ``write_face_pack``: both in ``<folder>/<pack>/`` under the released names, plus stand-ins
  for the landmark and gender/age models a pack also holds (the FaceID code ignores them).
* ``letterbox_scale``: the factor SCRFD's letterbox applies to an image (detector pixels per
  image pixel), to place a face at known image coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

STRIDES = (8, 16, 32)
ANCHORS = 2
DETECTOR_OUTPUTS = ("448", "471", "494", "451", "474", "497", "454", "477", "500")  # det_10g's output names
RECOGNITION_OUTPUT = "683"  # w600k_r50's
OPSET = 17
IR_VERSION = 8  # readable by onnxruntime >= 1.14

# The ArcFace alignment template (112 x 112 crop): eyes, nose tip, mouth corners.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


@dataclass(frozen=True)
class PlantedFace:
    """A face the detector reports: ``box`` (x1, y1, x2, y2) and ``landmarks`` [5, 2] in
    detector-input pixels, ``score`` before the brightness gate, on a stride ``stride`` anchor
    (the cell nearest the box centre unless ``cell`` (row, column) is given)."""
    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    score: float = 0.9
    stride: int = 32
    anchor: int = 0
    cell: tuple[int, int] | None = None

    def anchor_cell(self) -> tuple[int, int]:
        if self.cell is not None:
            return self.cell
        x1, y1, x2, y2 = self.box
        return round((y1 + y2) / 2 / self.stride), round((x1 + x2) / 2 / self.stride)


def face_from_template(centre: tuple[float, float], eye_distance: float, angle_degrees: float = 0.0,
                       **kwargs) -> PlantedFace:
    """A face whose landmarks are the ArcFace template turned by ``angle_degrees``, scaled to
    ``eye_distance`` between the eyes and centred on ``centre``; its box encloses them with a margin."""
    template = ARCFACE_TEMPLATE - ARCFACE_TEMPLATE.mean(axis=0)
    scale = eye_distance / np.linalg.norm(ARCFACE_TEMPLATE[1] - ARCFACE_TEMPLATE[0])
    angle = np.deg2rad(angle_degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = scale * template @ rotation.T + np.asarray(centre, dtype=np.float64)
    half = 1.4 * np.abs(points - np.asarray(centre)).max()
    box = (centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half)
    return PlantedFace(box=tuple(float(v) for v in box), landmarks=tuple(tuple(float(v) for v in p) for p in points),
                       **kwargs)


def letterbox_scale(height: int, width: int, detector_size: int) -> float:
    """Detector pixels per image pixel: SCRFD scales the image to fit ``detector_size``
    squared (the long side truncated to an integer) and pads it at the right or bottom."""
    if height / width > 1:
        return detector_size / height
    return int(detector_size * height / width) / height


def _helper():
    import onnx
    return onnx, onnx.helper, onnx.TensorProto, onnx.numpy_helper


def _model(graph):
    onnx, helper, _, _ = _helper()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="devtools.face_models")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def detector_model(faces: list[PlantedFace], gate_sharpness: float = 20.0, gate_level: float = -0.5):
    """The SCRFD look-alike as an ``onnx.ModelProto`` (see the module's docstring)."""
    _, helper, tensor, numpy_helper = _helper()
    nodes, initializers = [], []

    def constant(name, array, dtype=np.float32):
        initializers.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    planted = {stride: [] for stride in STRIDES}
    for face in faces:
        if face.stride not in planted or face.anchor not in range(ANCHORS):
            raise ValueError(f"a planted face needs a stride in {STRIDES} and an anchor in 0..{ANCHORS - 1}")
        planted[face.stride].append(face)

    outputs = {}
    for stride in STRIDES:
        pooled = f"pooled_{stride}"
        nodes.append(helper.make_node("AveragePool", ["input.1"], [pooled], kernel_shape=[stride, stride],
                                      strides=[stride, stride]))
        # The gate: sigmoid(sharpness * (mean of the channels - level)) per cell, the same for both anchors.
        gate_weight = constant(f"gate_weight_{stride}", np.full((ANCHORS, 3, 1, 1), gate_sharpness / 3))
        gate_bias = constant(f"gate_bias_{stride}", np.full((ANCHORS,), -gate_sharpness * gate_level))
        nodes.append(helper.make_node("Conv", [pooled, gate_weight, gate_bias], [f"gate_logit_{stride}"]))
        nodes.append(helper.make_node("Sigmoid", [f"gate_logit_{stride}"], [f"gate_{stride}"]))
        # This input's grid [h, w], for cropping or zero-padding the planted maps to it.
        grid = f"grid_{stride}"
        nodes.append(helper.make_node("Shape", [pooled], [f"pooled_shape_{stride}"]))
        nodes.append(helper.make_node("Slice", [f"pooled_shape_{stride}", constant(f"two_{stride}", [2], np.int64),
                                                constant(f"four_{stride}", [4], np.int64)], [grid]))
        rows = max([face.anchor_cell()[0] for face in planted[stride]], default=0) + 1
        columns = max([face.anchor_cell()[1] for face in planted[stride]], default=0) + 1
        for part, width in (("score", 1), ("box", 4), ("kps", 10)):
            # The planted values on a constant map [1, anchors * width, rows, columns] ...
            values_map = np.zeros((1, ANCHORS * width, rows, columns))
            for face in planted[stride]:
                row, column = face.anchor_cell()
                if row < 0 or column < 0:
                    raise ValueError(f"a planted face's anchor cell {row, column} is outside the image")
                centre = np.array([column * stride, row * stride], dtype=np.float64)
                x1, y1, x2, y2 = face.box
                if part == "score":
                    values = [face.score]
                elif part == "box":
                    values = [(centre[0] - x1) / stride, (centre[1] - y1) / stride,
                              (x2 - centre[0]) / stride, (y2 - centre[1]) / stride]
                else:
                    values = list(((np.asarray(face.landmarks, dtype=np.float64) - centre) / stride).reshape(-1))
                values_map[0, face.anchor * width: (face.anchor + 1) * width, row, column] = values
            # ... cropped to this input's grid (Slice clamps), then zero-padded up to it.
            cropped, placed = f"{part}_cropped_{stride}", f"{part}_map_{stride}"
            nodes.append(helper.make_node("Slice", [constant(f"{part}_planted_{stride}", values_map),
                                                    constant(f"{part}_starts_{stride}", [0, 0], np.int64), grid,
                                                    constant(f"{part}_axes_{stride}", [2, 3], np.int64)], [cropped]))
            nodes.append(helper.make_node("Shape", [cropped], [f"{part}_cropped_shape_{stride}"]))
            nodes.append(helper.make_node("Slice", [f"{part}_cropped_shape_{stride}", f"two_{stride}", f"four_{stride}"],
                                          [f"{part}_cropped_grid_{stride}"]))
            nodes.append(helper.make_node("Sub", [grid, f"{part}_cropped_grid_{stride}"], [f"{part}_missing_{stride}"]))
            nodes.append(helper.make_node("Concat", [constant(f"{part}_no_pads_{stride}", [0] * 6, np.int64),
                                                     f"{part}_missing_{stride}"], [f"{part}_pads_{stride}"], axis=0))
            nodes.append(helper.make_node("Pad", [cropped, f"{part}_pads_{stride}"], [placed], mode="constant"))
            if part == "score":
                nodes.append(helper.make_node("Mul", [placed, f"gate_{stride}"], [f"{part}_gated_{stride}"]))
                placed = f"{part}_gated_{stride}"
            nodes.append(helper.make_node("Transpose", [placed], [f"{part}_nhwc_{stride}"], perm=[0, 2, 3, 1]))
            name = DETECTOR_OUTPUTS[("score", "box", "kps").index(part) * len(STRIDES) + STRIDES.index(stride)]
            nodes.append(helper.make_node("Reshape", [f"{part}_nhwc_{stride}",
                                                      constant(f"{part}_shape_{stride}", [-1, width], np.int64)], [name]))
            outputs[name] = helper.make_tensor_value_info(name, tensor.FLOAT, [f"anchors_{stride}", width])

    graph = helper.make_graph(
        nodes, "scrfd_like", [helper.make_tensor_value_info("input.1", tensor.FLOAT, [1, 3, "?", "?"])],
        [outputs[name] for name in DETECTOR_OUTPUTS], initializer=initializers)
    return _model(graph)


def recognition_model(seed: int = 0, embedding: int = 512, size: int = 112):
    """The ArcFace look-alike as an ``onnx.ModelProto``: [N, 3, size, size] -> [N, embedding]."""
    _, helper, tensor, numpy_helper = _helper()
    rng = np.random.default_rng(seed)
    weights = {
        "conv1.weight": rng.normal(0, 0.3, (8, 3, 4, 4)), "conv1.bias": rng.normal(0, 0.1, (8,)),
        "conv2.weight": rng.normal(0, 0.15, (16, 8, 4, 4)), "conv2.bias": rng.normal(0, 0.1, (16,)),
    }
    flat = 16 * (size // 16) * (size // 16)
    weights["fc.weight"] = rng.normal(0, 1 / np.sqrt(flat), (embedding, flat))
    weights["fc.bias"] = rng.normal(0, 0.01, (embedding,))
    initializers = [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()]
    # No Sub*/Mul* node names among the first nodes: insightface would read those as an mxnet
    # export that normalises inside (mean 0, std 1); w600k_r50 has none and takes
    # (pixel - 127.5) / 127.5, like this network.
    nodes = [
        helper.make_node("Conv", ["input.1", "conv1.weight", "conv1.bias"], ["c1"], name="Conv_0", kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Relu", ["c1"], ["r1"], name="Relu_1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="Conv_2", kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Relu", ["c2"], ["r2"], name="Relu_3"),
        helper.make_node("Flatten", ["r2"], ["flat"], name="Flatten_4", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], [RECOGNITION_OUTPUT], name="Gemm_5", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "arcface_like", [helper.make_tensor_value_info("input.1", tensor.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info(RECOGNITION_OUTPUT, tensor.FLOAT, ["N", embedding])], initializer=initializers)
    return _model(graph)


def wrong_detector_model():
    """An ONNX file named like a detector that is not one: one [1, 3, ?, ?] input, two outputs."""
    _, helper, tensor, _ = _helper()
    nodes = [helper.make_node("GlobalAveragePool", ["input.1"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["scores"]),
             helper.make_node("Identity", ["scores"], ["boxes"])]
    graph = helper.make_graph(
        nodes, "not_scrfd", [helper.make_tensor_value_info("input.1", tensor.FLOAT, [1, 3, "?", "?"])],
        [helper.make_tensor_value_info("scores", tensor.FLOAT, [1, 3]),
         helper.make_tensor_value_info("boxes", tensor.FLOAT, [1, 3])])
    return _model(graph)


def write_model(model, path: Path) -> Path:
    import onnx
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_face_pack(folder: Path, faces: list[PlantedFace], pack: str = "buffalo_l", seed: int = 0,
                    detector_name: str = "det_10g.onnx", recognition_name: str | None = "w600k_r50.onnx") -> Path:
    """``<folder>/<pack>/`` with the detector, the recognition model (unless ``recognition_name``
    is None) and stand-ins for the landmark and gender/age files; returns the pack folder."""
    target = Path(folder) / pack
    write_model(detector_model(faces), target / detector_name)
    if recognition_name is not None:
        write_model(recognition_model(seed), target / recognition_name)
    for other in ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx"):
        (target / other).write_bytes(b"not read by the FaceID code")
    return target
