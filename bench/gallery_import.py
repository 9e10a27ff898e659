"""`fewshot gallery import` of a large embedded set: rows/s and the importing process's peak memory
at 1x and 10x the rows, in one run.

    python bench/gallery_import.py [--rows 100000] [--scale 10] [--dim 128]

Writes two Parquet OUT folders of random unit vectors (1,000 classes), imports each in its own
process into a fresh gallery, and prints rows/s and peak RSS. What must stay in memory is the
gallery's own state (its index: rows x dim x 6 bytes, printed beside; its id -> label map): the
import streams everything else, a batch of rows at a time.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import in_own_process, peak_rss_mib  # noqa: E402


def write_out(out: Path, rows: int, dim: int) -> None:
    from fewshot.embedded import ParquetOutput

    job = {"source": "bench", "items": rows, "listing": "", "encoder": "bench", "fingerprint": f"bench-{dim}",
           "dim": dim, "shard_size": 50_000, "format": "parquet"}
    out.mkdir(parents=True)
    (out / "job.json").write_text(json.dumps(job))
    parts = -(-rows // job["shard_size"])
    output = ParquetOutput(out, job, parts)
    rng = np.random.default_rng(0)
    for i in range(parts):
        n = min(job["shard_size"], rows - i * job["shard_size"])
        x = rng.normal(size=(n, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        first = i * job["shard_size"]
        output.write(i, x, [{"path": f"img/{first + j}.jpg", "label": f"class{(first + j) % 1000:04d}"}
                            for j in range(n)], [])
    output.finish("bench")


def child(out: str, data: str) -> None:
    from fewshot.gallery_store import GalleryStore
    from fewshot.transfer import import_embedded

    store = GalleryStore(data)
    started = time.perf_counter()
    report = import_embedded(store, out, "big", progress=False)
    seconds = time.perf_counter() - started
    store.close()
    print(json.dumps({"rows": report.imported, "seconds": seconds,
                      "rss_mib": peak_rss_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for rows in (args.rows, args.rows * args.scale):
            out = Path(tmp) / f"out{rows}"
            write_out(out, rows, args.dim)
            result = in_own_process(__file__, "--child", out, Path(tmp) / f"data{rows}")
            index_mib = rows * args.dim * 6 / 2**20  # the exact index keeps fp32 vectors and an fp16 pre-scan copy
            print(f"{rows:>9,} rows ({args.dim}-d): {result['rows'] / result['seconds']:8.0f} rows/s, peak RSS "
                  f"{result['rss_mib']:6.0f} MiB (the gallery's index, fp32 + fp16 pre-scan: {index_mib:5.0f} MiB)", flush=True)
            results.append((result["rss_mib"] - index_mib))
        print(f"peak RSS beyond the index: {results[0]:.0f} MiB at 1x, {results[1]:.0f} MiB at {args.scale}x (the rest of the "
          "growth is the gallery's id -> label map, ~170 bytes per example)")


if __name__ == "__main__":
    main()
