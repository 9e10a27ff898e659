"""dlib's CNN face detector (MMOD, ``mmod_human_face_detector.dat`` from ``face-recognition-models``),
read from its file by ``fewshot.dlib_format`` and run in ONNX Runtime: no dlib at detection time.

What dlib does, and so do we (dlib's ``input_rgb_image_pyramid``, ``loss_mmod_`` and
``cnn_face_detection_model_v1``):
1. The image, (x - mean) / 256 per channel, and its pyramid (each level 5/6 of the one before,
   ``floor`` of the size, made from it by bilinear resizing with the corners aligned, down to 5 px
   high) are tiled into one zero image: the levels in a first column, the smaller ones doubled back
   into a second column on the right, ``padding`` px between levels and ``outer_padding`` around.
2. One forward pass of the fully convolutional network (three 5x5 stride-2 convolutions, three 5x5,
   one 9x9 to one channel) gives a score map at 1/8 of the tiled image.
3. Every location scoring above the threshold (dlib's default 0) is a window of the detector's size
   (80x80) centred where that location's receptive field is centred, mapped back to the image
   through the level whose tile holds its centre.
4. Non-maximum suppression, best first: a window is dropped when its intersection over the
   bounding box of both exceeds the detector's threshold (0.338 for this model), as dlib's
   ``test_box_overlap`` does.

Batched: images of any sizes are tiled, zero-padded to one size and scored in one pass (zeros are
what dlib's tiled image holds outside the tiles, so padding changes no score). ONNX Runtime runs on
CUDA when onnxruntime-gpu is installed and a GPU is present, else on the CPU.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dlib_format import DlibFormatError, _Reader, read_layers, read_versions

MMOD_FILE = "mmod_human_face_detector.dat"
PYRAMID_DOWN = 6  # the model's input type is input_rgb_image_pyramid<pyramid_down<6>>: levels of 5/6
MIN_LEVEL_HEIGHT = 5


@dataclass
class Detector:
    convs: list[tuple[np.ndarray, np.ndarray, int, int, bool]]  # (weight, bias, stride, padding, relu)
    mean: tuple[float, float, float]
    window: tuple[int, int]  # (width, height)
    nms_iou: float
    padding: int
    outer_padding: int

    def output_size(self, rows: int, cols: int) -> tuple[int, int]:
        """The score map's size for a (rows, cols) input."""
        for weight, _, stride, padding, _ in self.convs:
            k = weight.shape[2]
            rows, cols = (rows + 2 * padding - k) // stride + 1, (cols + 2 * padding - k) // stride + 1
        return rows, cols

    def to_input(self, r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score-map locations -> the tiled image's pixel their receptive field is centred on."""
        for weight, _, stride, padding, _ in reversed(self.convs):
            k = weight.shape[2]
            r, c = r * stride - padding + k // 2, c * stride - padding + k // 2
        return r, c


def read_detector(path: str | Path) -> Detector:
    """Parse a serialised dlib MMOD network (``loss_mmod_``, an RGB image pyramid input)."""
    path = Path(path)
    r = _Reader(path.read_bytes())
    if r.int() != 1 or r.string() != "loss_mmod_":
        raise DlibFormatError(f"{path} is not a dlib MMOD detector (loss_mmod_)")
    version = r.int()
    if version == 1:
        windows = [(r.int(), r.int())]
    else:
        windows = []
        for _ in range(r.int()):
            window_version, width, height = r.int(), r.int(), r.int()
            if window_version == 2:
                r.string()  # the window's label
            windows.append((width, height))
    r.float(), r.float(), r.float()  # losses per false alarm and miss, truth-match IoU: training settings
    nms_iou, covered = r.float(), r.float()
    r.float(), r.float()  # the overlap that ignores a truth box: training
    if version >= 3:
        r.byte()  # assume_image_pyramid
    if version >= 4 and r.bool():
        raise DlibFormatError(f"{path}: a detector with bounding-box regression; fewshot reads plain MMOD")
    if len(windows) != 1 or covered < 1:
        raise DlibFormatError(f"{path}: {len(windows)} detector windows, covered-overlap {covered}; fewshot reads "
                              "one window and IoU-only suppression")
    versions = read_versions(r)
    kind = r.string()
    if kind not in ("input_rgb_image_pyramid", "input_rgb_image_pyramid2"):
        raise DlibFormatError(f"{path}: input layer {kind!r}; fewshot reads input_rgb_image_pyramid")
    mean = (r.float(), r.float(), r.float())
    padding, outer = (r.int(), r.int()) if kind.endswith("2") else (10, 11)  # dlib's defaults before "2"
    layers, convs = read_layers(r, versions, path), []
    for layer in layers:
        if layer.kind == "con":
            p = layer.params
            if p["stride"][0] != p["stride"][1] or p["padding"][0] != p["padding"][1]:
                raise DlibFormatError(f"{path}: a convolution with unequal strides or paddings")
            bias = p["bias"] if p["bias"] is not None else np.zeros(p["filters"], np.float32)
            convs.append([p["weight"], bias, p["stride"][0], p["padding"][0], False])
        elif layer.kind == "affine" and convs:  # folded into the convolution before it
            gamma, beta = layer.params["gamma"], layer.params["beta"]
            convs[-1][0] = convs[-1][0] * gamma[:, None, None, None]
            convs[-1][1] = convs[-1][1] * gamma + beta
        elif layer.kind == "relu" and convs:
            convs[-1][4] = True
        else:
            raise DlibFormatError(f"{path}: a {layer.kind} layer where fewshot reads convolutions, affines, relus")
    return Detector([tuple(c) for c in convs], mean, windows[0], nms_iou, padding, outer)


# ---------------------------------------------------------------------------------- the pyramid
Rect = tuple[int, int, int, int]  # (left, top, right, bottom), inclusive, as dlib's rectangle


def pyramid_rects(nr: int, nc: int, padding: int, outer: int) -> tuple[list[Rect], int, int]:
    """Where each pyramid level of an nr x nc image lies in the tiled image, and its size (rows, cols):
    dlib's ``compute_tiled_image_pyramid_details``."""
    sizes = [(nr, nc)]
    while True:
        nr, nc = math.floor(nr * (PYRAMID_DOWN - 1) / PYRAMID_DOWN), math.floor(nc * (PYRAMID_DOWN - 1) / PYRAMID_DOWN)
        if nr * nc == 0 or nr < MIN_LEVEL_HEIGHT:
            break
        sizes.append((nr, nc))
    total = sum(h + padding for h, _ in sizes) - 2 * padding
    height, previous = 0, 0
    first_h, width = sizes[0]
    for h, w in sizes:  # the first column runs until the next level fits beside the one before it
        if w <= width - previous - padding and (height - first_h) * 2 >= total - first_h:
            break
        height += h + padding
        previous = w
    height -= padding
    rects: list[Rect] = []
    y, i = outer, 0
    while y < height + outer and i < len(sizes):
        h, w = sizes[i]
        rects.append((outer, y, outer + w - 1, y + h - 1))
        y += h + padding
        i += 1
    y -= padding
    while i < len(sizes):  # the second column, bottom-up along the right edge
        h, w = sizes[i]
        right, bottom = outer + width - 1, y - 1
        rect = (right - w + 1, bottom - h + 1, right, bottom)
        first = rects[0]
        if rect[0] <= first[2] and rect[2] >= first[0] and rect[1] <= first[3] and rect[3] >= first[1]:
            break
        rects.append(rect)
        y -= h + padding
        i += 1
    return rects, height + 2 * outer, width + 2 * outer


def _resize_aligned(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(3, h, w) -> (3, rows, cols), bilinear with the corner pixels aligned (dlib's resize_image)."""
    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.arange(n_out) * ((n_in - 1) / max(n_out - 1, 1))
        low = np.floor(x).astype(np.int64)
        return low, np.minimum(low + 1, n_in - 1), (x - low).astype(np.float32)

    top, bottom, fy = axis(image.shape[1], rows)
    image = image[:, top] * (1 - fy)[None, :, None] + image[:, bottom] * fy[None, :, None]
    left, right, fx = axis(image.shape[2], cols)
    return image[:, :, left] * (1 - fx) + image[:, :, right] * fx


def tiled_pyramid(rgb: np.ndarray, detector: Detector) -> tuple[np.ndarray, list[Rect]]:
    """(h, w, 3) uint8 -> the (3, NR, NC) float32 tiled pyramid the network reads, and its levels' rects."""
    rects, nr, nc = pyramid_rects(rgb.shape[0], rgb.shape[1], detector.padding, detector.outer_padding)
    out = np.zeros((3, nr, nc), np.float32)
    level = (rgb.transpose(2, 0, 1).astype(np.float32) - np.array(detector.mean, np.float32)[:, None, None]) / 256
    for i, (left, top, right, bottom) in enumerate(rects):
        if i:
            level = _resize_aligned(level, bottom - top + 1, right - left + 1)
        out[:, top:bottom + 1, left:right + 1] = level
    return out, rects


def _to_image(rects: list[Rect], x: float, y: float, box: tuple[float, float, float, float]):
    """A window in the tiled image -> the image's coordinates, through the level nearest its centre."""
    point = (round(x), round(y))
    best, best_d = 0, math.inf
    for i, (left, top, right, bottom) in enumerate(rects):
        d = math.hypot(max(left - point[0], 0, point[0] - right), max(top - point[1], 0, point[1] - bottom))
        if d == 0:  # inside this level's tile
            best = i
            break
        if d < best_d:
            best, best_d = i, d
    left, top = rects[best][:2]
    x0, y0, x1, y1 = box[0] - left, box[1] - top, box[2] - left, box[3] - top
    ratio = PYRAMID_DOWN / (PYRAMID_DOWN - 1)
    for _ in range(best):
        x0, y0, x1, y1 = x0 * ratio + 0.3, y0 * ratio + 0.3, x1 * ratio + 0.3, y1 * ratio + 0.3
    return x0, y0, x1, y1


def _overlaps(a: Rect, b: Rect, iou: float) -> bool:
    """dlib's test_box_overlap: the intersection over the bounding box of both (inclusive pixels)."""
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]) + 1, min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return False
    ow, oh = max(a[2], b[2]) - min(a[0], b[0]) + 1, max(a[3], b[3]) - min(a[1], b[1]) + 1
    return iw * ih / (ow * oh) > iou


def detections(scores: np.ndarray, rects: list[Rect], detector: Detector, threshold: float) -> list[tuple[Rect, float]]:
    """A (R, C) score map -> (box (left, top, right, bottom) in the image, score), best first, suppressed."""
    rows, cols = np.nonzero(scores > threshold)
    values = scores[rows, cols]
    order = np.argsort(-values, kind="stable")
    ys, xs = detector.to_input(rows[order].astype(np.float64), cols[order].astype(np.float64))
    half_w, half_h = (detector.window[0] - 1) / 2, (detector.window[1] - 1) / 2
    kept: list[tuple[Rect, float]] = []
    for x, y, value in zip(xs, ys, values[order]):
        box = _to_image(rects, x, y, (x - half_w, y - half_h, x + half_w, y + half_h))
        box = tuple(int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5)) for v in box)  # lround
        if not any(_overlaps(other, box, detector.nms_iou) for other, _ in kept):
            kept.append((box, float(value)))
    return kept


# ---------------------------------------------------------------------------------- running it
def onnx_model(detector: Detector):
    """The network as an ONNX graph: (n, 3, H, W) tiled pyramids -> (n, 1, H', W') scores."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, weights, name = [], [], "pyramid"
    for i, (weight, bias, stride, padding, relu) in enumerate(detector.convs):
        weights += [numpy_helper.from_array(weight.astype(np.float32), f"w{i}"),
                    numpy_helper.from_array(bias.astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [name, f"w{i}", f"b{i}"], [f"c{i}"], strides=[stride, stride],
                                      pads=[padding] * 4, kernel_shape=list(weight.shape[2:])))
        name = f"c{i}"
        if relu:
            nodes.append(helper.make_node("Relu", [name], [f"r{i}"]))
            name = f"r{i}"
    nodes[-1].output[0] = "scores"
    graph = helper.make_graph(nodes, "mmod", [helper.make_tensor_value_info("pyramid", TensorProto.FLOAT,
                                                                           ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 1, "sh", "sw"])],
                              weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


class CNNFaceDetector:
    """Images -> faces, as dlib's ``cnn_face_detection_model_v1`` finds them. Thread-safe; one ONNX
    Runtime session per process (made on first use, not pickled)."""

    def __init__(self, weights: str | Path, threads: int = 1) -> None:
        self.weights, self.threads = Path(weights), threads
        self._session, self._lock = None, threading.Lock()
        self.detector = read_detector(self.weights)

    def __getstate__(self) -> dict:
        return {"weights": self.weights, "threads": self.threads, "detector": self.detector}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._session, self._lock = None, threading.Lock()

    def session(self):
        with self._lock:
            if self._session is None:
                import onnxruntime as ort

                options = ort.SessionOptions()
                options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
                providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                             if p in ort.get_available_providers()]
                self._session = ort.InferenceSession(onnx_model(self.detector).SerializeToString(), options,
                                                     providers=providers)
            return self._session

    def __call__(self, rgb: np.ndarray, threshold: float = 0.0) -> list[tuple[Rect, float]]:
        return self.detect_many([rgb], threshold)[0]

    def detect_many(self, images: list[np.ndarray], threshold: float = 0.0) -> list[list[tuple[Rect, float]]]:
        """Per (h, w, 3) uint8 image: its faces, best first. One forward pass for all of them."""
        out: list[list[tuple[Rect, float]]] = [[] for _ in images]
        tiled = {i: tiled_pyramid(rgb, self.detector) for i, rgb in enumerate(images)}
        tiled = {i: t for i, t in tiled.items() if min(self.detector.output_size(*t[0].shape[1:])) >= 1}
        if not tiled:  # every image too small for the network's field (a few px): no face in any
            return out
        rows, cols = max(t.shape[1] for t, _ in tiled.values()), max(t.shape[2] for t, _ in tiled.values())
        batch = np.zeros((len(tiled), 3, rows, cols), np.float32)
        for j, (t, _) in enumerate(tiled.values()):
            batch[j, :, :t.shape[1], :t.shape[2]] = t
        scores = self.session().run(None, {"pyramid": batch})[0][:, 0]
        for s, (i, (t, rects)) in zip(scores, tiled.items()):  # each image's own part of the map: the rest is padding
            rows, cols = self.detector.output_size(t.shape[1], t.shape[2])
            out[i] = detections(s[:rows, :cols], rects, self.detector, threshold)
        return out
