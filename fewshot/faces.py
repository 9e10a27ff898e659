"""Faces: find, align and embed them.

Detection and landmarks are dlib's (the HOG frontal face detector and the 5-point shape predictor,
from the ``dlib-bin`` wheel); the aligned chip is dlib's geometry (150 px, padding 0.25, as dlib's
own ``compute_face_descriptor``); the network is dlib's ResNet metric model from the
``face-recognition-models`` package, read from its ``.dat`` by ``fewshot.dlib_format`` and run in
our runtimes (ONNX Runtime on the CPU, PyTorch fp16 on CUDA) like every encoder.

Encoder specs: ``face`` (= ``face:detect``: every face of a photo, found by dlib's HOG detector,
largest first; where none is found in a small photo it is searched again at twice the size, up to
twice, and where HOG finds none at all, by the CNN detector; ``face:detect:N`` always upsamples N
times, HOG alone), ``face:cnn`` (the same, found by dlib's CNN
detector, ported in ``fewshot.face_cnn``; ``face:cnn:N``) and ``face:crop`` (the image already is a
face crop: no detection, the landmarks are found in the whole image). All give the same vectors'
space (one fingerprint): they differ in which faces they find, not in how one is embedded.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UnknownEncoder, WeightsNotFound
from .images import Instance, Preprocessing, upload_scale

INSTALL = 'pip install dlib-bin face-recognition-models  (or: pip install -e ".[face]")'
NETWORK_FILE = "dlib_face_recognition_resnet_model_v1.dat"
LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
CHIP_SIZE, CHIP_PADDING = 150, 0.25  # dlib's compute_face_descriptor geometry
AUTO_SHORT_SIDE = 400  # auto: a photo with no face found is searched again doubled while its short side is below
# Detection runs on a copy at most this long (reduced by a whole factor): HOG costs ~1 s on every pixel of a
# 12 MP photo, ~90 ms here; the landmarks and the chip then come from every pixel. In a 4000 px photo the
# smallest face found is then ~250 px (the detector's ~80 px, scaled back).
DETECT_LONG_SIDE = 1280
# A big JPEG is decoded at reduced scale (decode_image's at_least) keeping this short side: a 4:3 photo then
# keeps a long side >= 1600, where the smallest face the 1280 px search finds (~80 px there) spans >= 100 px,
# all that the chip's face takes (150 px with padding 0.25). So no chip loses a pixel it would use, and a
# 12 MP photo decodes at half scale (~4x fewer pixels than full).
DECODE_SHORT_SIDE = 1200
MODES = ("detect", "cnn", "crop")


def model_file(name: str) -> Path:
    """A model file of the face-recognition-models package, found without importing it (its
    ``__init__`` needs pkg_resources, which current setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFound(f"the face encoder needs dlib's models and detector: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise WeightsNotFound(f"{path} is missing; reinstall face-recognition-models")
    return path


def _dlib():
    try:
        import dlib
    except ImportError:
        raise WeightsNotFound(f"the face encoder needs dlib for detection and landmarks: {INSTALL}") from None
    return dlib


class FaceLocator:
    """Image -> aligned face chips with their boxes, largest face first. Picklable (decode workers):
    dlib's detector and predictor are made on first use in each thread."""

    kind = "faces"

    def __init__(self, mode: str = "detect", upsample: int | None = None) -> None:
        if mode not in MODES:
            raise UnknownEncoder(f"face mode {mode!r}: choose detect, cnn or crop (face:detect, face:cnn, face:crop)")
        if upsample is not None and not 0 <= upsample <= 3:
            raise UnknownEncoder(f"face upsampling must be 0..3 doublings, got {upsample}")
        self.mode, self.upsample = mode, upsample
        self.landmarks = model_file(LANDMARKS_FILE)
        _dlib()
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {"mode": self.mode, "upsample": self.upsample, "landmarks": self.landmarks}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def at_least(self, prep: Preprocessing | None = None) -> int | None:
        """The short side a photo must keep when decoded (None: every pixel, for face:detect:N)."""
        return DECODE_SHORT_SIDE if self.upsample is None else None

    def describe(self) -> dict:
        """What decides the vectors' space (the fingerprint): the alignment, not how faces are found."""
        return {"landmarks": "dlib 5-point", "chip": CHIP_SIZE, "padding": CHIP_PADDING}

    def _tools(self):
        if not hasattr(self._local, "predictor"):
            dlib = _dlib()
            self._local.detector = cnn_detector() if self.mode == "cnn" else dlib.get_frontal_face_detector()
            self._local.predictor = dlib.shape_predictor(str(self.landmarks))
        return self._local.detector, self._local.predictor

    def detect(self, rgb: np.ndarray) -> list[tuple]:
        """(face rectangle, detector score), largest first. Auto: as found at the photo's size (the
        detector's smallest face is ~80 px); none in a small photo -> again at twice the size, and once more;
        none at all with HOG -> the CNN detector (a small photo at twice its size): 0.3% of LFW's photos,
        where HOG misses turned or shaded faces, at no cost to the others."""
        detector = self._tools()[0]

        def run(times: int) -> list[tuple]:
            if self.mode == "cnn":  # upsampled by 2**times, boxes scaled back
                return cnn_faces(detector, rgb, times)
            rects, scores, _ = detector.run(rgb, times, 0.0)  # the detector's own threshold: a score > 0
            return list(zip(rects, scores))

        if self.upsample is not None:
            found = run(self.upsample)
        else:
            found, times, short = run(0), 0, min(rgb.shape[:2])
            while not found and short < AUTO_SHORT_SIDE and times < 2:
                short, times = short * 2, times + 1
                found = run(times)
            if not found and self.mode == "detect":  # HOG saw none: the CNN, which finds turned faces HOG misses
                found = cnn_faces(cnn_detector(), rgb, 1 if min(rgb.shape[:2]) < AUTO_SHORT_SIDE else 0)
        return sorted(found, key=lambda face: -face[0].area())

    def _find(self, image: Image.Image, rgb: np.ndarray) -> list[tuple]:
        """(face rectangle in ``rgb``'s pixels, score), ``rgb`` being the RGB ``image``'s: a big photo is
        searched on a reduced copy, the boxes scaled back (face:detect:N always searches every pixel)."""
        long_side = max(rgb.shape[:2])
        if long_side <= DETECT_LONG_SIDE or self.upsample is not None:
            return self.detect(rgb)
        dlib = _dlib()
        small = np.asarray(image.reduce(math.ceil(long_side / DETECT_LONG_SIDE)))
        sy, sx = rgb.shape[0] / small.shape[0], rgb.shape[1] / small.shape[1]
        return [(dlib.rectangle(int(r.left() * sx), int(r.top() * sy), int((r.right() + 1) * sx) - 1,
                                int((r.bottom() + 1) * sy) - 1), score) for r, score in self.detect(small)]

    def __call__(self, image: Image.Image, prep: Preprocessing | None = None) -> list[Instance]:
        dlib = _dlib()
        image = image if image.mode == "RGB" else image.convert("RGB")  # converted once, for both uses
        rgb = np.asarray(image)
        predictor = self._tools()[1]
        height, width = rgb.shape[:2]
        boxes = [(dlib.rectangle(0, 0, width - 1, height - 1), None)] if self.mode == "crop" else self._find(image, rgb)
        out, scale = [], upload_scale(image)  # boxes in the upload's pixels, also when decoded at reduced scale
        for box, score in boxes:
            shape = predictor(rgb, box)
            chip = dlib.get_face_chip(rgb, shape, CHIP_SIZE, CHIP_PADDING)
            x0, y0 = max(0, box.left()), max(0, box.top())
            x1, y1 = min(width, box.right() + 1), min(height, box.bottom() + 1)
            if scale != 1:
                x0, y0, x1, y1 = (round(v * scale) for v in (x0, y0, x1, y1))
            points = tuple((round(p.x * scale), round(p.y * scale)) for p in shape.parts())
            out.append(Instance(np.ascontiguousarray(np.asarray(chip).transpose(2, 0, 1)), (x0, y0, x1, y1),
                                None if score is None else round(float(score), 4), points))
        return out


@functools.cache
def cnn_detector():
    """This process's CNN face detector (``fewshot.face_cnn``), read from the model file once; its ONNX
    Runtime session is thread-safe, so the decode threads share it."""
    from .face_cnn import MMOD_FILE, CNNFaceDetector

    return CNNFaceDetector(model_file(MMOD_FILE))


def cnn_faces(detector, rgb: np.ndarray, times: int) -> list[tuple]:
    """(dlib rectangle, score) of the CNN detector's faces in ``rgb`` upsampled ``times`` doublings
    (bilinear, as dlib's pyramid_up doubles), in ``rgb``'s pixels."""
    dlib, factor = _dlib(), 2 ** times
    image = rgb if not times else np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] * factor,
                                                                          rgb.shape[0] * factor), Image.BILINEAR))
    return [(dlib.rectangle(*(round(v / factor) for v in box)), score) for box, score in detector(image)]


def parse_face_args(args: list[str]) -> FaceLocator:
    """``face[:detect[:N]|:crop]`` -> its locator."""
    mode = args[0] if args else "detect"
    upsample = None
    if len(args) > 1:
        if mode not in ("detect", "cnn") or not args[1].isdigit():
            raise UnknownEncoder(f"face:{':'.join(args)}: use face, face:detect, face:detect:N (N upsamplings), "
                                 "face:cnn, face:cnn:N or face:crop")
        upsample = int(args[1])
    return FaceLocator(mode, upsample)


def build_face_network(weights: Path):
    """dlib's metric ResNet as a float-in trunk, and the preprocessing that reproduces dlib's input
    scaling (x - mean) / 256 as (x / 255 - mean / 255) / (256 / 255)."""
    from .dlib_format import read_dlib_net, to_torch

    net = read_dlib_net(weights)
    mean = tuple(m / 255.0 for m in net.input_mean)
    prep = Preprocessing((net.input_size, net.input_size), net.input_size, "bilinear", mean, (256.0 / 255.0,) * 3,
                         "squash")
    return to_torch(net), prep
