"""Bytes -> RGB image with limits, and an image -> the encoder's uint8 input pixels.

Decoding is the one place untrusted bytes meet C code, so every failure becomes ``InvalidImage``.
Resizing is PIL's antialiased resampling of only the region the centre crop keeps: no torch, and
~1 ms for a 640x480 JPEG.
"""
from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageTooLarge, InvalidImage

MAX_BYTES = 32 * 1024 * 1024
MAX_PIXELS = 50_000_000  # ~7000 x 7000; a larger "photo" is almost always a decompression bomb

IMAGE_SUFFIXES = frozenset(
    ".jpg .jpeg .png .bmp .gif .tif .tiff .webp .pgm .ppm .pbm .pnm".split()
)


@dataclass(frozen=True)
class Preprocessing:
    """How an encoder wants its pixels: resize the short side, centre-crop, normalise.

    Built from a model's own data config (timm or open_clip), never typed by hand.
    """

    size: tuple[int, int]  # (height, width) fed to the network
    resize: int  # short side after resizing, before the centre crop
    interpolation: str  # "bicubic" or "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"  # "shortest" (resize + centre crop) or "squash" (straight to size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(tuple(d["size"]), int(d["resize"]), d["interpolation"],
                   tuple(d["mean"]), tuple(d["std"]), d.get("resize_mode", "shortest"))


def decode_image(data: bytes, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
                 at_least: int | None = None) -> Image.Image:
    """Image bytes -> upright RGB PIL image (EXIF orientation applied, first frame of animations).

    ``at_least``: the short side the caller needs. A JPEG at least twice that is decoded at reduced
    scale (the DCT's 1/2, 1/4 or 1/8: a 12 MP photo costs ~10 ms instead of ~100), never below it.
    Raises ``InvalidImage`` (``ImageTooLarge`` for size limits) for anything else.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImage(f"expected image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidImage("empty image: the upload has zero bytes")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image is {len(data):,} bytes; the limit is {max_bytes:,}")
    try:
        with warnings.catch_warnings():
            # our own pixel limit below replaces PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}")
            if width == 0 or height == 0:
                raise InvalidImage(f"image has no pixels ({width}x{height})")
            if at_least and image.format == "JPEG" and min(width, height) >= 2 * at_least:
                scale = at_least / min(width, height)  # draft keeps at least the size asked for
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            image.seek(0)  # animated GIF/WebP/APNG: the first frame
            image.load()
            reduced = width / image.width
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
            if reduced != 1:
                image.info[DECODED_AT] = reduced
            return image
    except InvalidImage:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image has too many pixels (decompression bomb guard: {exc})") from None
    except UnidentifiedImageError as exc:
        raise InvalidImage(_reason(exc)) from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
            struct.error, MemoryError, ZeroDivisionError, KeyError, AttributeError) as exc:
        raise InvalidImage(f"could not decode image: {_reason(exc)}") from None


DECODED_AT = "fewshot.reduced"  # image.info key: how many times smaller than the upload it was decoded


def upload_scale(image: Image.Image) -> float:
    """The factor from ``image``'s pixels to the uploaded image's (1 unless decoded at reduced scale):
    boxes found in it are multiplied by it to be reported in the upload's pixels."""
    return float(image.info.get(DECODED_AT, 1.0))


def upload_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the uploaded image ``image`` was decoded from."""
    scale = upload_scale(image)
    return (round(image.size[0] * scale), round(image.size[1] * scale))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image: the bytes are in no image format this service reads (JPEG, PNG, WebP, ...)"
    text = str(exc).split("\n")[0][:200]
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"image is truncated or corrupt ({text or type(exc).__name__})"
    return text or type(exc).__name__


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1, ...) -> RGB; alpha is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def to_pixels(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """RGB image -> (3, H, W) uint8: short side resized to ``prep.resize``, centre crop to ``prep.size``.

    Only the crop is computed: PIL resamples the source region it comes from at the full resize's
    scale (its filter reaches past the region into the image, as the full resize's does), so the
    pixels are those of resize-then-crop, and memory is bounded by the crop whatever the image's shape
    (a 100000x1 PNG would otherwise resize to 25,600,000 x 256).
    """
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    width, height = rgb.size
    crop_h, crop_w = prep.size
    resample = RESAMPLING[prep.interpolation]
    if prep.resize_mode == "squash":
        out = rgb if rgb.size == (crop_w, crop_h) else rgb.resize((crop_w, crop_h), resample)
        return np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1))
    # as torchvision's Resize(int): the short side becomes ``resize``, the long one keeps the ratio
    short, long = sorted((height, width))
    new_short, new_long = prep.resize, int(prep.resize * long / short)
    new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    new_h, new_w = max(new_h, crop_h), max(new_w, crop_w)
    top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
    if (new_h, new_w) == (height, width):
        out = rgb.crop((left, top, left + crop_w, top + crop_h))
    else:
        sy, sx = height / new_h, width / new_w
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        out = rgb.resize((crop_w, crop_h), resample, box=box)
    return np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1))


RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass
class Instance:
    """One thing an encoder embeds from an image: its pixels and where in the image it came from."""
    pixels: np.ndarray  # (3, H, W) uint8, the network's input
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in the original image's pixels
    score: float | None = None  # the face detector's (its SVM margin: > 0 found, > 1 sure); None: no detector
    landmarks: tuple[tuple[int, int], ...] | None = None  # a face's 5 points (dlib's), the original's pixels

    def off_centre(self, size: tuple[int, int]) -> float:
        """Squared distance of the box's centre from the centre of an image of ``size`` (width, height)."""
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2 - size[0] / 2) ** 2 + ((y0 + y1) / 2 - size[1] / 2) ** 2


class WholeImage:
    """The locator of ordinary encoders: the whole image is the one instance."""

    kind = "image"

    @staticmethod
    def at_least(prep: Preprocessing) -> int:
        """The short side decoding must keep for ``prep`` (see ``decode_image``)."""
        return prep.resize if prep.resize_mode == "shortest" else max(prep.size)

    def __call__(self, image: Image.Image, prep: Preprocessing) -> list[Instance]:
        return [Instance(to_pixels(image, prep), (0, 0, image.width, image.height))]

    def describe(self) -> dict:
        return {}


THUMBNAIL_SIZE = 160


@dataclass
class KeptImage:
    """What a gallery keeps of an example's image, written with its vector in one transaction."""
    thumbnail: bytes | None  # a small JPEG for pages
    original: bytes | None  # the uploaded bytes, to re-embed with another encoder
    media_type: str | None  # of the original, e.g. image/jpeg


def thumbnail(image: Image.Image, size: int = THUMBNAIL_SIZE) -> bytes:
    """A small JPEG of an (already decoded, upright) image: at most ``size`` px on its long side."""
    small = image.convert("RGB") if image.mode != "RGB" else image.copy()
    small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def media_type(data: bytes) -> str | None:
    """The MIME type of image bytes by their format (None if PIL does not know it)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return Image.MIME.get(image.format or "")
    except Exception:  # noqa: BLE001 - any failure means: unknown
        return None


def load_pixels(data: bytes, prep: Preprocessing, max_bytes: int = MAX_BYTES,
                max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image bytes -> (3, H, W) uint8 encoder input; raises ``InvalidImage``."""
    return to_pixels(decode_image(data, max_bytes, max_pixels, WholeImage.at_least(prep)), prep)
