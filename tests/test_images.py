"""Decoding: every mode becomes RGB, orientation is honoured, every bad input is one domain error."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot.errors import ImageTooLarge, InvalidImage
from fewshot.images import Preprocessing, decode_image, to_pixels

from .conftest import jpeg_bytes, photo


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "1", "I;16"])
def test_png_modes_become_rgb(mode):
    base = photo("chelsea").resize((64, 48))
    image = base.convert(mode) if mode != "I;16" else Image.fromarray(
        np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    decoded = decode_image(encode(image, "PNG"))
    assert decoded.mode == "RGB" and decoded.size == (64, 48)
    grey = np.asarray(base.convert("L"), dtype=float)
    if mode == "I;16":  # 16-bit scaled back to 8 bits, not clipped to white
        assert np.abs(np.asarray(decoded, dtype=float)[..., 0] - grey).mean() < 1.0


def test_cmyk_jpeg_becomes_rgb():
    decoded = decode_image(encode(photo("coffee").convert("CMYK"), "JPEG"))
    assert decoded.mode == "RGB"


def test_transparent_pixels_composite_on_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(decode_image(encode(image, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    red = np.asarray(decode_image(data))[0, 0]
    assert red[0] > 200 and red[2] < 50


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(encode(image, "JPEG", exif=exif, quality=95))
    assert decoded.size == (20, 40)
    pixels = np.asarray(decoded, dtype=float).mean(axis=(1, 2))
    assert pixels[:15].mean() > 200 and pixels[-15:].mean() < 50  # white half now on top


BAD = {
    "empty": b"",
    "text": b"hello, this is not an image at all",
    "html": b"<!doctype html><html><body>nope</body></html>",
    "truncated_jpeg": jpeg_bytes(photo("chelsea"))[:4000],
    "truncated_png": encode(photo("chelsea"), "PNG")[:5000],
    "jpeg_header_only": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    "png_signature_only": b"\x89PNG\r\n\x1a\n",
    "corrupt_middle": (lambda b: b[:600] + bytes(len(b) - 1200) + b[-600:])(jpeg_bytes(photo("coffee"))),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_bytes_raise_invalid_image(name):
    with pytest.raises(InvalidImage) as info:
        decode_image(BAD[name])
    assert str(info.value)  # a message a person can read


def test_not_bytes_raises_invalid_image():
    with pytest.raises(InvalidImage, match="expected image bytes"):
        decode_image("a string")  # type: ignore[arg-type]


def test_byte_limit():
    data = jpeg_bytes(photo("chelsea"))
    with pytest.raises(ImageTooLarge, match="limit"):
        decode_image(data, max_bytes=len(data) - 1)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (30000, 30000)), "PNG")  # ~100 KB on disk, 900 MP decoded
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageTooLarge, match="pixels"):
        decode_image(bomb)


def test_pixel_limit_is_a_parameter():
    with pytest.raises(ImageTooLarge):
        decode_image(jpeg_bytes(photo("chelsea")), max_pixels=1000)


def test_fast_resize_matches_pil_within_rounding():
    """Resampling only the crop's region gives the pixels of timm's PIL pipeline (Resize + CenterCrop)."""
    prep = Preprocessing((224, 224), 256, "bicubic", (0.5,) * 3, (0.5,) * 3)
    for name in ["chelsea", "astronaut", "coffee", "rocket"]:
        image = decode_image(jpeg_bytes(photo(name), (640, 480)))
        ours = to_pixels(image, prep).astype(int)
        w, h = image.size
        scale = 256 / min(w, h)
        size = (int(w * scale), 256) if w >= h else (256, int(h * scale))
        ref = image.resize(size, Image.BICUBIC)
        left, top = int(round((ref.width - 224) / 2)), int(round((ref.height - 224) / 2))
        ref = np.asarray(ref.crop((left, top, left + 224, top + 224))).transpose(2, 0, 1).astype(int)
        assert ours.shape == (3, 224, 224)
        assert np.abs(ours - ref).max() <= 1
        assert (ours != ref).mean() < 0.02


def test_tall_and_small_images_are_cropped_to_size():
    prep = Preprocessing((224, 224), 256, "bilinear", (0.5,) * 3, (0.5,) * 3)
    for size in [(100, 600), (600, 100), (10, 10), (224, 224)]:
        assert to_pixels(Image.new("RGB", size), prep).shape == (3, 224, 224)


# ---------------------------------------------------------------- what people send: big photos, thin strips
SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def _jpeg(image, size=None, quality=90) -> bytes:
    buffer = io.BytesIO()
    (image.resize(size, Image.BICUBIC) if size else image).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def test_a_big_jpeg_is_decoded_at_reduced_scale_but_never_below_what_is_asked():
    photo = Image.open(SAMPLES / "cat" / "1.jpg").convert("RGB")
    data = _jpeg(photo, (4000, 3000))
    reduced = decode_image(data, at_least=256)
    assert min(reduced.size) >= 256 and reduced.size[0] <= 1000  # 1/4 or 1/8 of 4000x3000
    assert decode_image(data).size == (4000, 3000)  # asked for nothing: all of it
    small = _jpeg(photo, (640, 480))
    assert decode_image(small, at_least=256).size == (640, 480)  # under 2x: decoded as it is


def test_big_photos_embed_as_the_full_resolution_pipeline_does(encoder):
    """12 MP JPEGs made from every sample photo: the reduced-scale path against decoding every pixel
    (cosine >= 0.995 each; the worst is printed)."""
    from fewshot.images import to_pixels

    worst = 1.0
    for path in sorted(SAMPLES.glob("*/*.jpg")):
        photo = Image.open(path).convert("RGB")
        for size in [(4000, 3000), (3000, 4000)]:
            data = _jpeg(photo, size)
            fast = encoder.embed(encoder.preprocess(data)[None])[0]
            full = encoder.embed(to_pixels(decode_image(data), encoder.preprocessing)[None])[0]
            worst = min(worst, float(fast @ full))
    print(f"worst cosine, reduced-scale vs full-resolution decoding: {worst:.5f}")
    assert worst >= 0.995


def test_small_photos_are_preprocessed_exactly_as_before(encoder):
    """Under twice the size asked for, nothing changes: the same pixels as decoding everything."""
    from fewshot.images import to_pixels

    data = (SAMPLES / "coffee" / "1.jpg").read_bytes()
    assert np.array_equal(encoder.preprocess(data), to_pixels(decode_image(data), encoder.preprocessing))


@pytest.mark.parametrize("size", [(10_000, 1), (100_000, 1), (1, 100_000)])
def test_thin_images_take_bounded_memory(size, tmp_path):
    """A 115-byte PNG of 100000x1 used to ask for 20 GB (its short side resized to 256 before the
    crop). Now the crop's region is resized alone: measured in a process of its own, < 50 MB more."""
    import subprocess
    import sys

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    png_file = tmp_path / "thin.png"
    png_file.write_bytes(buffer.getvalue())
    script = f"""
import resource, sys
from fewshot.images import Preprocessing, load_pixels
prep = Preprocessing((224, 224), 256, "bicubic", (0.5,) * 3, (0.5,) * 3)
data = open({str(png_file)!r}, "rb").read()
load_pixels(data, prep)  # warm: torch's kernels, PIL's decoder
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pixels = load_pixels(data, prep)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(pixels.shape, int(pixels[0].mean()), grown // 1024)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    shape, red, grown_mb = run.stdout.split(") ")[0] + ")", *map(int, run.stdout.split(") ")[1].split())
    assert shape == "(3, 224, 224)" and red >= 190  # a right answer: the strip's colour, at the model's size
    assert grown_mb < 50, f"{grown_mb} MB"
