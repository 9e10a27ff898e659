"""fewshot against what a user would write instead, on the photos users send, in one run.

    python bench/peers.py [--seconds 15] [--skip-storm] [--rounds 3]

Servers, each a process of its own on 127.0.0.1 with the same EfficientNet-Lite0 weights: `fewshot
serve`; a LitServe deployment of the same ONNX graph (bench/litserve_server.py: LitServe's batching,
its own PIL decode and resize) with 1 and with 2 inference workers, the better reported; the naive
server (bench/naive_server.py). 12 classes enrolled (one 640x480 photo each). Load from a separate
process (bench/serve.py's load generator): `recognize` with one JPEG per request,

1. 640x480 JPEGs, 16 clients; 4000x3000 JPEGs (12 MP, quality 85), 8 clients; and 1 client p50 at 12 MP.
2. Overload, fewshot only: 64 clients posting 12 MP photos for --seconds: accepted requests' p99, the
   share answered 503 and how fast those came.
3. The storm, fewshot only: 50 requests of 32 photos of 12 MP at once: every status, the slowest
   answer, the server's peak RSS (VmHWM).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import photo_jpegs  # noqa: E402
from serve import enroll, free_port, measure, start, stop  # noqa: E402


def big_jpegs(count: int) -> list[bytes]:
    """12 MP JPEGs of real photo content (scikit-image's photos, crops upscaled to 4000x3000)."""
    out = []
    for _, data in photo_jpegs(count, (4000, 3000)):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).save(buffer, "JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def gallery_file(enrolled: list[tuple[str, bytes]], cache: Path, out: Path) -> tuple[Path, Path]:
    """The LitServe peer's gallery (prototypes of the same photos) and the ONNX graph it runs."""
    from fewshot import create_encoder

    encoder = create_encoder("efficientnet_lite0", device="cpu", runtime="onnx", cache_dir=cache)
    rows = encoder.embed(np.stack([encoder.preprocess(data) for _, data in enrolled]))
    np.savez(out, prototypes=rows, names=np.asarray([label for label, _ in enrolled]))
    return out, encoder.runtime.path  # the very graph fewshot runs (a shared cache holds others too)


def line(name: str, r: dict) -> str:
    return f"{name:22s} {r['rps']:6.1f} req/s, p50 {r['p50']:7.1f} ms, p99 {r['p99']:7.1f} ms, errors {r['errors']}"


def overload(url: str, image: bytes, clients: int, seconds: float) -> dict:
    """``clients`` threads posting ``image`` for ``seconds``: latencies by status."""
    stop, lock, seen = time.monotonic() + seconds, threading.Lock(), {}

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < stop:
                started = time.perf_counter()
                try:
                    status = http.post(url, files=[("files", ("q.jpg", image, "image/jpeg"))]).status_code
                except httpx.HTTPError:
                    status = 0
                with lock:
                    seen.setdefault(status, []).append(time.perf_counter() - started)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seen


def storm(url: str, images: list[bytes], requests: int) -> tuple[dict, float]:
    statuses, slowest, lock = {}, 0.0, threading.Lock()

    def one(i: int) -> None:
        nonlocal slowest
        files = [("files", (f"{j}.jpg", images[(i + j) % len(images)], "image/jpeg")) for j in range(32)]
        started = time.perf_counter()
        try:
            status = httpx.post(url, files=files, timeout=300).status_code
        except httpx.HTTPError:
            status = 0
        with lock:
            statuses[status] = statuses.get(status, 0) + 1
            slowest = max(slowest, time.perf_counter() - started)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses, slowest


def peak_rss_mib(pid: int) -> float:
    """Peak RSS of the server: its process and every worker process under it, added up."""
    def own(p: int) -> float:
        with open(f"/proc/{p}/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) / 1024

    def children(p: int) -> list[int]:
        try:
            return [int(c) for c in open(f"/proc/{p}/task/{p}/children").read().split()]
        except OSError:
            return []

    return own(pid) + sum(peak_rss_mib(c) for c in children(pid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per measurement (default 15)")
    parser.add_argument("--skip-storm", action="store_true", help="leave out the 50 x 32 x 12 MP storm")
    parser.add_argument("--only", default=None, help="run only these servers (comma-separated names)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the servers' turn this many times; the "
                        "ratios are given per round and as their median (default 1)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fewshot-peers-"))
    cache = Path(os.environ.get("FEWSHOT_CACHE_DIR", work / "cache"))
    env = {**os.environ, "FEWSHOT_CACHE_DIR": str(cache)}
    enrolled = photo_jpegs(12, (640, 480), seed=1)
    small = [data for _, data in photo_jpegs(64, (640, 480), seed=2)]
    big = big_jpegs(12)
    npz, graph = gallery_file(enrolled, cache, work / "gallery.npz")
    py = sys.executable
    commands = {
        "fewshot": lambda port: [py, "-m", "fewshot.cli", "serve", "--port", str(port), "--data-dir",
                                 str(work / "data")],
        "litserve (1 worker)": lambda port: [py, str(ROOT / "litserve_server.py"), "--port", str(port), "--onnx",
                                             str(graph), "--gallery", str(npz), "--workers", "1"],
        "litserve (2 workers)": lambda port: [py, str(ROOT / "litserve_server.py"), "--port", str(port), "--onnx",
                                              str(graph), "--gallery", str(npz), "--workers", "2"],
        "naive": lambda port: [py, str(ROOT / "naive_server.py"), "--port", str(port), "--cache-dir", str(cache)],
    }
    if args.only:
        commands = {name: command for name, command in commands.items() if name in args.only.split(",")}
    results, pids = {}, {}
    for round_ in range(args.rounds):  # servers in turn, each alone on the machine; rounds repeat the turn
        for name, command in commands.items():
            port = free_port()
            proc = start(command(port), port, env=env, health="/health" if "litserve" in name else "/readyz")
            base = f"http://127.0.0.1:{port}"
            url = f"{base}/predict" if "litserve" in name else f"{base}/v1/galleries/bench/recognize"
            try:
                if "litserve" not in name:
                    enroll(base, enrolled)
                measure(url, small, 2, 3)  # warm-up
                results[name, "640x480", round_] = measure(url, small, 16, args.seconds)
                results[name, "12 MP", round_] = measure(url, big, 8, args.seconds)
                results[name, "12 MP, 1 client", round_] = measure(url, big, 1, args.seconds)
                if name == "fewshot" and round_ == 0:
                    pids["fewshot"] = proc.pid
                    _fewshot_extras(url, big, args, proc.pid)
            finally:
                stop(proc)
    for load in ("640x480", "12 MP", "12 MP, 1 client"):
        print(f"-- recognize, {load} JPEGs ({16 if load == '640x480' else 8 if load == '12 MP' else 1} clients)")
        for round_ in range(args.rounds):
            for name in commands:
                where = "" if args.rounds == 1 else f"round {round_ + 1}: "
                print(f"   {where}" + line(name, results[name, load, round_]))
        if args.only:
            continue
        ratios = []
        for round_ in range(args.rounds):
            ours = results["fewshot", load, round_]
            peer = max((results[n, load, round_] for n in commands if "litserve" in n), key=lambda r: r["rps"])
            naive = results["naive", load, round_]
            ratios.append(ours["rps"] / peer["rps"])
            print(f"   {'' if args.rounds == 1 else f'round {round_ + 1}: '}fewshot / LitServe (better of 1, 2 "
                  f"workers): {ratios[-1]:.2f}x throughput, p99 {ours['p99'] / peer['p99']:.2f}x, p50 "
                  f"{ours['p50'] / peer['p50']:.2f}x; fewshot / naive {ours['rps'] / naive['rps']:.2f}x")
        if args.rounds > 1:
            print(f"   median of {args.rounds} rounds: {float(np.median(ratios)):.2f}x throughput "
                  f"(from {min(ratios):.2f}x to {max(ratios):.2f}x)")


def _fewshot_extras(url: str, big: list[bytes], args: argparse.Namespace, pid: int) -> None:
    seen = overload(url, big[0], 64, args.seconds)
    accepted, refused = seen.get(200, []), seen.get(503, [])
    total = sum(len(v) for v in seen.values())
    print(f"-- overload, fewshot: 64 clients on 12 MP photos for {args.seconds:g} s: {total} answers, statuses "
          f"{ {s: len(v) for s, v in sorted(seen.items())} }; accepted p99 "
          f"{np.percentile(accepted, 99) * 1000 if accepted else float('nan'):.0f} ms; 503 share "
          f"{len(refused) / max(1, total):.0%}, their p99 {np.percentile(refused, 99) * 1000 if refused else 0:.0f} ms")
    if args.skip_storm:
        return
    before = peak_rss_mib(pid)
    statuses, slowest = storm(url, big, 50)
    print(f"-- storm, fewshot: 50 requests of 32 x 12 MP at once: statuses {statuses}, slowest {slowest:.1f} s; "
          f"peak RSS {peak_rss_mib(pid):.0f} MiB, every process of the server added up (before the storm "
          f"{before:.0f} MiB)")


if __name__ == "__main__":
    main()
