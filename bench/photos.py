"""What a 12-megapixel phone photo costs before the network: bytes -> the encoder's input pixels.

    python bench/photos.py [--repeats 10]

12 MP JPEGs (4000x3000, quality 90) made from real photos (scikit-image's astronaut, chelsea, coffee
and the project's samples); per image, one core (torch and PIL single-threaded): PIL's plain decode of
every pixel, the old path (decode every pixel, then resize), and `encoder.preprocess` (a JPEG decoded
at reduced scale, then only the centre crop resampled: PIL, single-threaded, no torch). Also a
640x480 JPEG, and the face encoder's whole path (decode,
detection, alignment) on the same 12 MP photos. Prints milliseconds per image (median) and ratios.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def photos() -> list[Image.Image]:
    from skimage import data

    out = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("astronaut", "chelsea", "coffee")]
    return out + [Image.open(p).convert("RGB") for p in sorted((ROOT / "samples").glob("*/*.jpg"))]


def jpeg(image: Image.Image, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    image.resize(size, Image.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def median_ms(fn, items: list, repeats: int) -> float:
    fn(items[0])
    times = []
    for _ in range(repeats):
        for item in items:
            started = time.perf_counter()
            fn(item)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="passes over the photos (default 10)")
    args = parser.parse_args()
    from fewshot import create_encoder
    from fewshot.images import decode_image, to_pixels

    lite = create_encoder("efficientnet_lite0", device="cpu", runtime="onnx")
    big = [jpeg(p, (4000, 3000)) for p in photos()]
    small = [jpeg(p, (640, 480)) for p in photos()]

    def plain(data: bytes) -> None:
        Image.open(io.BytesIO(data)).convert("RGB")

    def old(data: bytes) -> np.ndarray:
        return to_pixels(decode_image(data), lite.preprocessing)

    rows = []
    for name, items in [("12 MP JPEG", big), ("640x480 JPEG", small)]:
        pil, before, now = (median_ms(fn, items, args.repeats) for fn in (plain, old, lite.preprocess))
        rows.append((name, pil, before, now))
        print(f"{name:13s} PIL plain decode {pil:7.1f} ms | decode all + resize {before:7.1f} ms | "
              f"encoder.preprocess {now:6.1f} ms  ({before / now:.1f}x faster; {now / pil:.2f}x PIL's plain decode)")
    try:
        face = create_encoder("face", device="cpu", runtime="onnx")
    except Exception as exc:  # noqa: BLE001 - the face extra is optional
        print(f"faces: skipped ({exc})")
        return
    from fewshot.faces import FaceLocator

    every_pixel = FaceLocator()
    full = median_ms(lambda data: every_pixel(decode_image(data)), big[:3], max(1, args.repeats // 5))
    ms = median_ms(face.instances, big[:3], max(1, args.repeats // 5))
    print(f"faces, 12 MP JPEG: decode + detect + align {ms:.0f} ms per photo (target <= 100 ms), every pixel decoded "
          f"{full:.0f} ms ({full / ms:.1f}x); decoded at half scale, detection on a copy of at most 1280 px")


if __name__ == "__main__":
    main()
