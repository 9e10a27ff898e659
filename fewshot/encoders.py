"""Encoders: images -> unit-length float32 embeddings.

``create_encoder(spec)`` finds the backbone through ``backbones.ENCODERS``, runs it on PyTorch or
ONNX Runtime and wraps it in an ``Encoder``. A spec is
``efficientnet_lite0`` (the embedded default), ``timm:<name>[:<weights>]`` or
``open_clip:<arch>[:<pretrained tag | weights file>]``; ``<weights>`` may be ``random`` for a
seeded random initialisation (tests, smoke runs). Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from .backbones import Source, parse_spec
from .errors import DimensionMismatch, NoFace, UnknownEncoder
from .files import write_atomic
from .images import MAX_BYTES, MAX_PIXELS, Instance, Preprocessing, WholeImage, decode_image, upload_size
from .runtimes import (OnnxRuntime, Runtime, TorchRuntime, export_onnx, make_padding_static, quantize_onnx,
                       require_torch, torch_available, wrap_network)

EXPORT_VERSION = 1  # bump when the exported graph changes, to invalidate cached ONNX files
DEFAULT_ENCODER = "efficientnet_lite0"
RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
CALIBRATION_IMAGES = 256  # at most, spread evenly over what is given


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "fewshot"


class Encoder:
    """A network behind a runtime, with the preprocessing its weights were trained with, and a
    locator that says what in an image it embeds (the whole image, or each face)."""

    def __init__(self, spec: str, dim: int, fingerprint: str, preprocessing: Preprocessing,
                 runtime: Runtime, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
                 locator=None) -> None:
        self.spec = self.name = spec
        self.dim = dim
        self.fingerprint = fingerprint
        self.preprocessing = preprocessing
        self.runtime = runtime
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.locator = locator or WholeImage()

    def __repr__(self) -> str:
        return (f"Encoder({self.spec!r}, dim={self.dim}, runtime={self.runtime.name}, "
                f"device={self.runtime.device}, fingerprint={self.fingerprint})")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, *self.preprocessing.size)

    @property
    def at_least(self) -> int | None:
        """The short side its images must keep when decoded (``decode_image``); None: the full image."""
        return decode_floor(self.locator, self.preprocessing)

    @property
    def finds_faces(self) -> bool:
        return self.locator.kind == "faces"

    def instances(self, image: bytes | Image.Image) -> list[Instance]:
        """Image bytes (or a PIL image) -> what it embeds in it, each with its box: the whole image,
        or every face, largest first (none: an empty list). Raises ``InvalidImage``."""
        if not isinstance(image, Image.Image):
            image = decode_image(image, self.max_bytes, self.max_pixels, self.at_least)
        return self.locator(image, self.preprocessing)

    def main(self, image: bytes | Image.Image) -> tuple[Instance, int]:
        """(its main instance: the largest face for face encoders, how many instances it holds);
        raises ``InvalidImage`` (``NoFace`` when there is none)."""
        return locate_main(image, self.locator, self.preprocessing, self.max_bytes, self.max_pixels)

    def preprocess(self, image: bytes | Image.Image) -> np.ndarray:
        """Image bytes (or a PIL image) -> (3, H, W) uint8 input of its main instance."""
        return self.main(image)[0].pixels

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """(n, 3, H, W) uint8 -> (n, dim) float32, each row L2-normalised. One forward pass."""
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape:
            raise DimensionMismatch(f"expected a (n, {', '.join(map(str, self.input_shape))}) batch "
                                    f"from encoder.preprocess, got {batch.shape}")
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(self.runtime(batch.astype(np.uint8, copy=False)))

    def embed_images(self, images: Iterable[bytes | Image.Image], batch_size: int = 32) -> np.ndarray:
        """Images -> (n, dim) unit rows, in order; raises ``InvalidImage`` on the first bad one."""
        pixels = [self.preprocess(image) for image in images]
        rows = [self.embed(np.stack(pixels[i:i + batch_size])) for i in range(0, len(pixels), batch_size)]
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)


def locate_main(image: bytes | Image.Image, locator, prep: Preprocessing, max_bytes: int,
                max_pixels: int) -> tuple[Instance, int]:
    """The one way from image bytes to what an encoder embeds of them: decode within the limits,
    locate (``locator``: the whole image, or faces), take the main instance. (main, instances found)."""
    if not isinstance(image, Image.Image):
        image = decode_image(image, max_bytes, max_pixels, decode_floor(locator, prep))
    found = locator(image, prep)
    return main_instance(found, locator.kind == "faces", upload_size(image)), len(found)


def decode_floor(locator, prep: Preprocessing) -> int | None:
    """The short side an image must keep when decoded for ``locator``: None (all of it) unless the
    locator says (faces are found on the full image)."""
    at_least = getattr(locator, "at_least", None)
    return at_least(prep) if at_least is not None else None


def main_instance(instances: list[Instance], faces: bool, size: tuple[int, int] | None = None) -> Instance:
    """The instance an image stands for. Faces: the one nearest the centre of the image (of ``size``,
    upload pixels) among those at least half as wide as the widest; a photo of someone centres them,
    and a small face near the middle does not outrank them. On the 218 LFW dev photos with several
    faces whose person is known from their other photos, this took the right face in all 218, the
    widest face in 204 (``bench/faces_wild.py``)."""
    if not instances:
        raise NoFace("no face found in the image: use a photo where the face is frontal and at least ~40 px "
                     "wide, or crop closer to it" if faces else "nothing to embed in the image")
    if not faces or size is None or len(instances) == 1:
        return instances[0]
    widest = max(f.box[2] - f.box[0] for f in instances)
    return min((f for f in instances if f.box[2] - f.box[0] >= widest / 2), key=lambda f: f.off_centre(size))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in float32 (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# ---------------------------------------------------------------- factory
def create_encoder(spec: str = DEFAULT_ENCODER, device: str = "auto", runtime: str = "auto",
                   cache_dir: str | Path | None = None, threads: int | None = None,
                   max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
                   calibration: str | Path | list | None = None) -> Encoder:
    """Build an encoder. ``device``: auto|cpu|cuda; ``runtime``: auto|torch|onnx|onnx-int8.

    ``auto`` runs PyTorch fp16 on a CUDA GPU and ONNX Runtime (exported once, cached under
    ``cache_dir`` by the weights' hash) on the CPU. A warm cache needs neither timm nor an export.
    ``onnx-int8`` quantises the ONNX model statically with activation ranges measured on
    ``calibration`` (a folder, .zip or list file of images like those to be embedded, or a list of
    image bytes); its vectors get their own fingerprint, so they never mix with fp32 ones.
    """
    if runtime == "onnx-int8":
        fp32 = create_encoder(spec, device, "onnx", cache_dir, threads, max_bytes, max_pixels)
        return _quantized(fp32, calibration, threads)
    device, runtime = resolve_device_runtime(device, runtime)
    source = parse_spec(spec)
    spec = _canonical_spec(source)
    limits = {"max_bytes": max_bytes, "max_pixels": max_pixels}
    folder = Path(cache_dir or default_cache_dir()) / "onnx"
    weights_id = _file_sha256(source.weights) if source.weights else None
    limits["locator"] = source.locator
    if runtime == "onnx" and weights_id:
        cached = _cached_onnx(folder / _cache_key(spec, weights_id, source), spec, threads, limits)
        if cached:
            return cached
    require_torch(f"exporting the {spec} encoder (not in the cache {folder})" if runtime == "onnx"
                  else f"the {spec} encoder on the torch runtime", timm=source.kind in ("efficientnet_lite0", "timm"))
    network, prep = _network(source)
    dim = _output_dim(network, prep)
    weights_id = weights_id or _state_dict_sha256(network)
    fingerprint = _fingerprint(spec, weights_id, prep, source)
    if runtime == "torch":
        return Encoder(spec, dim, fingerprint, prep, TorchRuntime(network, device), **limits)
    stem = folder / _cache_key(spec, weights_id, source)
    export_onnx(network, prep.size, stem.with_suffix(".onnx"))
    meta = {"spec": spec, "dim": dim, "fingerprint": fingerprint, "preprocessing": prep.to_dict()}
    write_atomic(stem.with_suffix(".json"), json.dumps(meta, indent=1))
    return Encoder(spec, dim, fingerprint, prep, OnnxRuntime(stem.with_suffix(".onnx"), threads), **limits)


def _quantized(fp32: Encoder, calibration, threads: int | None) -> Encoder:
    """The int8 twin of an ONNX encoder, quantised once per calibration set and cached beside it."""
    pixels = calibration_pixels(fp32, calibration)
    calibration_id = hashlib.sha256(pixels.tobytes()).hexdigest()
    fingerprint = hashlib.sha256(f"{fp32.fingerprint}|int8|{calibration_id}".encode()).hexdigest()[:24]
    fp32_path = fp32.runtime.path
    path = fp32_path.with_name(f"{fp32_path.stem}-int8-{calibration_id[:16]}.onnx")
    if not path.is_file():
        quantize_onnx(fp32_path, path, pixels)
    return Encoder(fp32.spec, fp32.dim, fingerprint, fp32.preprocessing, OnnxRuntime(path, threads, "onnx-int8"),
                   fp32.max_bytes, fp32.max_pixels, fp32.locator)


def calibration_pixels(encoder: Encoder, calibration) -> np.ndarray:
    """Calibration images (a folder, .zip or list file, or a list of image bytes) -> encoder inputs."""
    from .datasets import Reader, list_items
    from .errors import InvalidImage, InvalidSource

    if calibration is None:
        raise UnknownEncoder("the onnx-int8 runtime needs calibration images: pass a folder of 100-256 images "
                             "like the ones you will embed (e.g. --calibration DIR or FEWSHOT_CALIBRATION)")
    if isinstance(calibration, (str, Path)):
        items = list_items(calibration)
        step = max(1, len(items) // CALIBRATION_IMAGES)
        reader = Reader()
        images = (reader.read(item.path) for item in items[::step][:CALIBRATION_IMAGES])
    else:
        images = iter(calibration[:CALIBRATION_IMAGES])
    pixels = []
    for image in images:
        try:
            pixels.append(encoder.preprocess(image))
        except InvalidImage:
            continue
    if len(pixels) < 8:
        raise InvalidSource(f"calibration needs at least 8 readable images, got {len(pixels)}")
    return np.stack(pixels)


def resolve_device_runtime(device: str, runtime: str) -> tuple[str, str]:
    """Validated (device, runtime) with ``auto`` decided."""
    if runtime not in RUNTIMES:
        raise UnknownEncoder(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UnknownEncoder(f"unknown device {device!r}; choose auto, cpu or cuda")
    device = _resolve_device(device)
    if runtime == "auto":
        runtime = "torch" if device.startswith("cuda") else "onnx"
    if runtime == "onnx" and device != "cpu":
        raise UnknownEncoder("the onnx runtime runs on the CPU; use --runtime torch for CUDA")
    return device, runtime


def _cached_onnx(stem: Path, spec: str, threads: int | None, limits: dict) -> Encoder | None:
    """The encoder from an earlier export, if both its files are there."""
    if not (stem.with_suffix(".json").is_file() and stem.with_suffix(".onnx").is_file()):
        return None
    meta = json.loads(stem.with_suffix(".json").read_text())
    return Encoder(spec, meta["dim"], meta["fingerprint"], Preprocessing.from_dict(meta["preprocessing"]),
                   OnnxRuntime(stem.with_suffix(".onnx"), threads), **limits)


def _network(source: Source):
    """The uint8-in, features-out network with static padding, and its preprocessing."""
    trunk, prep = source.build(source)
    return make_padding_static(wrap_network(trunk, prep.mean, prep.std), prep.size), prep


def _output_dim(network, prep: Preprocessing) -> int:
    import torch

    with torch.no_grad():
        return int(network(torch.zeros(1, 3, *prep.size, dtype=torch.uint8)).shape[1])


def _canonical_spec(source: Source) -> str:
    if source.kind == "efficientnet_lite0":
        return "efficientnet_lite0"
    if source.kind in ("pixels", "finetuned", "face"):
        return f"{source.kind}:{source.arch}"
    weights = "random" if source.weights is None else str(source.weights)
    return f"{source.kind}:{source.arch}:{weights}"


def _resolve_device(device: str) -> str:
    if device == "cpu" or (device == "auto" and not (torch_available() and _gpu_visible())):
        return "cpu"  # no torch import on a machine without a GPU: serving the ONNX exports never needs it
    require_torch(f"device {device!r}")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise UnknownEncoder(f"device {device!r} asked for, but no CUDA GPU is visible; use --device cpu")
    return device


def _gpu_visible() -> bool:
    """Could CUDA be there? On Linux without NVIDIA device nodes (or WSL's) it cannot, and importing torch
    to ask would cost ~1 s and a few hundred MB of every serving process."""
    import glob
    import sys

    return not sys.platform.startswith("linux") or bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/dxg"))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _state_dict_sha256(network) -> str:
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _cache_key(spec: str, weights_id: str, source: Source) -> str:
    """The exported file's name: by network, so face:detect, face:cnn and face:crop (one network, faces
    found differently) share one export."""
    network = "face" if source.kind == "face" else spec
    return hashlib.sha256(f"{EXPORT_VERSION}|{network}|{weights_id}".encode()).hexdigest()[:32]


def _fingerprint(spec: str, weights_id: str, prep: Preprocessing, source: Source) -> str:
    """A hash of the weights, the preprocessing and the alignment: vectors with equal fingerprints are
    comparable (so face:detect and face:crop share one, their chips being aligned alike)."""
    if source.kind in ("finetuned", "face"):
        arch = source.kind  # the weights' hash says which; the folder may move; the face mode does not matter
    else:
        arch = spec.rsplit(":", 1)[0] if spec.count(":") >= 2 else spec
    payload = {"arch": arch, "weights": weights_id, "preprocessing": prep.to_dict()}
    if alignment := source.locator.describe():
        payload["alignment"] = alignment
    payload = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]
