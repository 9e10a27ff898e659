"""Helpers shared by the benchmarks: real-photo JPEG folders and a steady timer."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

PHOTOS = ["chelsea", "astronaut", "coffee", "rocket", "cat", "camera", "immunohistochemistry", "motorcycle_left",
          "hubble_deep_field", "retina", "page", "horse"]


def photo_jpegs(count: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list[tuple[str, bytes]]:
    """``count`` (label, JPEG bytes) pairs: random crops of scikit-image's real photos, resized to ``size``."""
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = []
    for name in PHOTOS:
        try:
            sources.append((name, Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")))
        except Exception:  # a photo this scikit-image version lacks
            continue
    out = []
    for i in range(count):
        name, image = sources[i % len(sources)]
        w, h = image.size
        s = rng.uniform(0.6, 1.0)
        cw, ch = int(w * s), int(h * s)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        buffer = io.BytesIO()
        image.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC).save(buffer, "JPEG", quality=90)
        out.append((name, buffer.getvalue()))
    return out


def write_folder(root: Path, jpegs: list[tuple[str, bytes]]) -> Path:
    for i, (label, data) in enumerate(jpegs):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i:06d}.jpg").write_bytes(data)
    return root


def rate(fn: Callable[[], int], seconds: float, warmup: int = 1) -> float:
    """Items per second of ``fn`` (which returns how many items it handled), run for ~``seconds``."""
    for _ in range(warmup):
        fn()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += fn()
    return done / (time.perf_counter() - start)


def fewshot(*args, check: bool = True) -> subprocess.CompletedProcess:
    """Run the ``fewshot`` command as a user would (printing it to stderr)."""
    print("$ fewshot " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-m", "fewshot.cli", *map(str, args)], check=check)


def embedded(src: Path, out: Path, encoder: str, cache_dir: Path) -> tuple[np.ndarray, list[dict]]:
    """`fewshot embed SRC OUT` once (kept in OUT), then its embeddings and manifest rows."""
    from fewshot.embedded import load_embedded

    if not (out / "meta.json").is_file():
        fewshot("embed", src, out, "--encoder", encoder, "--cache-dir", cache_dir, "--quiet")
    embeddings, rows, _ = load_embedded(out)
    return np.asarray(embeddings), rows


def peak_rss_mib() -> float:
    """This process's peak resident memory so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_own_process(script: str, flag: str, *args) -> dict:
    """Run ``script flag args...`` (a measurement that must own its process: a fresh Ray instance, a
    peak RSS of its own) and return the JSON object it printed last."""
    done = subprocess.run([sys.executable, script, flag, *map(str, args)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])
