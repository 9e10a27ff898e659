"""Replicas on PostgreSQL: how fast one replica sees another's enrollment, what a second replica and the
PostgreSQL store cost or bring to query throughput, enrollment latency, and cold start.

    python bench/replicas.py [--seconds 20] [--clients 8] [--visible 100] [--cold-examples 100000]

Starts a throwaway PostgreSQL (Debian's packages, a temp dir, as in the tests) and real `fewshot serve`
processes on this machine, each with the embedded default encoder; the load comes from a separate
process. Each query is `recognize` with one 640x480 JPEG against a gallery of 12 classes.

1. Enroll-to-visible: replica A enrolls a new class (one photo); we poll replica B with that photo's
   vector (`/recognize/embedding`, so the poll costs no encoding) until B names the class. p50 / p99.
2. Throughput of `recognize`, same machine, same cores: one replica pinned to every core vs two replicas
   pinned to half the cores each (`taskset`), both on PostgreSQL; and one replica on SQLite vs one on
   PostgreSQL. The database is not on the query path, so the ratios should be ~1. All servers run at
   once and the configurations are measured in turn, --rounds times.
3. Enroll latency (committed): through HTTP (one photo, encoder included), and the store alone
   (`Gallery.add` of one 1280-d vector, in this process), PostgreSQL vs SQLite.
4. Cold start: a gallery of --cold-examples 1280-d examples; seconds to build its index from PostgreSQL
   (and from SQLite without its snapshot), per 100,000 examples; and a replica's time to /readyz.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from common import photo_jpegs  # noqa: E402
from serve import free_port, measure_groups, start  # noqa: E402
from serve import stop as stop_server  # noqa: E402

from tests.postgres import TempPostgres  # noqa: E402

DIM = 1280


def serve(cores: str, cache: Path, data_dir: Path, database_url: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = ["taskset", "-c", cores, sys.executable, "-m", "fewshot.cli", "serve", "--workers", "1", "--port", str(port),
            "--data-dir", str(data_dir)] + (["--database-url", database_url] if database_url else [])
    proc = start(argv, port, env={**os.environ, "FEWSHOT_CACHE_DIR": str(cache)})
    return proc, f"http://127.0.0.1:{port}"


def stop(*procs) -> None:
    for proc in procs:
        stop_server(proc)


def enroll_all(base: str, jpegs: list[tuple[str, bytes]], gallery: str = "bench") -> list[float]:
    """One enrollment per class, in turn; returns each one's latency (committed when it returns)."""
    latencies = []
    with httpx.Client(base_url=base, timeout=60) as http:
        for label, data in jpegs:
            started = time.perf_counter()
            r = http.post(f"/v1/galleries/{gallery}/classes/{label}/examples",
                          files=[("files", ("e.jpg", data, "image/jpeg"))])
            latencies.append(time.perf_counter() - started)
            assert r.status_code == 201, r.text
    return latencies


def throughput(bases: list[str], queries: list[bytes], clients: int, seconds: float) -> dict:
    groups = [(f"{base}/v1/galleries/bench/recognize", clients // len(bases)) for base in bases]
    measure_groups(groups, queries, 3)  # warm-up
    results = measure_groups(groups, queries, seconds)
    return {"rps": sum(r["rps"] for r in results), "errors": sum(r["errors"] for r in results),
            "p50": float(np.mean([r["p50"] for r in results])), "p99": float(max(r["p99"] for r in results))}


def visible(a: str, b: str, jpegs: list[tuple[str, bytes]]) -> list[float]:
    """Seconds from A's 201 to B naming the class, per enrollment."""
    out = []
    with httpx.Client(base_url=a, timeout=60) as ha, httpx.Client(base_url=b, timeout=60) as hb:
        for i, (_, data) in enumerate(jpegs):
            vector = hb.post("/v1/embed", files=[("files", ("q.jpg", data, "image/jpeg"))]).json()["embeddings"][0]
            label = f"new{i:04d}"
            r = ha.post(f"/v1/galleries/bench/classes/{label}/examples", files=[("files", ("e.jpg", data, "image/jpeg"))])
            assert r.status_code == 201, r.text
            acknowledged = time.perf_counter()
            while True:
                found = hb.post("/v1/galleries/bench/recognize/embedding", json={"vectors": [vector]}).json()
                if found["results"][0]["matches"][0]["label"] == label:
                    out.append(time.perf_counter() - acknowledged)
                    break
                if time.perf_counter() - acknowledged > 10:
                    raise SystemExit(f"{label} not visible on B after 10 s")
    return out


def store_commit(location, n: int = 200) -> list[float]:
    from fewshot.gallery_store import GalleryStore

    store = GalleryStore(location)
    try:
        g = store.get("commit", DIM, "fp", create=True)
        rng = np.random.default_rng(0)
        out = []
        for i in range(n):
            x = rng.normal(size=(1, DIM)).astype(np.float32)
            started = time.perf_counter()
            g.add(f"c{i % 20}", x)
            out.append(time.perf_counter() - started)
        return out
    finally:
        store.close()


def cold(location, examples: int, fill: bool = True) -> float:
    """Seconds to open a gallery of ``examples`` examples with no snapshot: its index built from the database."""
    from fewshot.gallery_store import GalleryStore

    if fill:
        store = GalleryStore(location)
        g = store.get("cold", DIM, "fp", create=True)
        rng = np.random.default_rng(1)
        for start_row in range(0, examples, 10_000):
            n = min(10_000, examples - start_row)
            g.add_many([f"c{i % 1000}" for i in range(start_row, start_row + n)], rng.normal(size=(n, DIM)))
        store.close()
    if isinstance(location, Path):
        for name in ("index.faiss", "index.faiss.fp16", "index.json"):
            (location / "cold" / name).unlink(missing_ok=True)
    started = time.perf_counter()
    store = GalleryStore(location)
    assert len(store.get("cold")) == examples
    seconds = time.perf_counter() - started
    store.close()
    return seconds


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="each throughput configuration measured this often")
    parser.add_argument("--visible", type=int, default=100, help="enrollments timed for enroll-to-visible")
    parser.add_argument("--cold-examples", type=int, default=100_000)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs at least 2 cores (one replica per half)")
    half = len(cores) // 2
    every, first, second = (",".join(map(str, c)) for c in (cores, cores[:half], cores[half:2 * half]))
    work = Path(tempfile.mkdtemp(prefix="fewshot-bench-replicas-"))
    cache = work / "cache"
    gallery = photo_jpegs(12, seed=1)  # one photo per class, 12 classes
    queries = [data for _, data in photo_jpegs(48, seed=2)]
    fresh = photo_jpegs(args.visible, seed=3)
    print(f"{len(cores)} cores; load: {args.clients} clients for {args.seconds:.0f} s per configuration")

    with TempPostgres(port=54330) as pg:
        # Every server up at once (idle ones cost nothing), so the configurations are measured in turn,
        # round after round: no configuration gets the machine's warmer or colder moments.
        url = pg.new_database()
        lite, base_lite = serve(every, cache, work / "sqlite", None)
        one, base_one = serve(every, cache, work / "pg1", url)
        a, base_a = serve(first, cache, work / "pga", url)
        b, base_b = serve(second, cache, work / "pgb", url)
        enroll_all(base_lite, gallery)
        enroll_all(base_one, gallery)  # the replicas A and B see it too: same database
        configs = {"sqlite, 1 replica": [base_lite], "postgresql, 1 replica": [base_one],
                   "postgresql, 2 replicas": [base_a, base_b]}
        rounds = {name: [] for name in configs}
        for _ in range(args.rounds):
            for name, bases in configs.items():
                rounds[name].append(throughput(bases, queries, args.clients, args.seconds))
        enroll_sqlite, enroll_pg = [], []
        for i in range(0, 40, 10):  # alternating, ten at a time
            enroll_sqlite += enroll_all(base_lite, fresh[i:i + 10], "enroll")
            enroll_pg += enroll_all(base_one, fresh[i:i + 10], "enroll")
        seen = visible(base_a, base_b, fresh)
        stop(lite, one, a, b)

        print(f"\nrecognize throughput (1 JPEG per request), {args.rounds} rounds, configurations in turn")
        for name, runs in rounds.items():
            print(f"  {name:24s} " + "  ".join(f"{r['rps']:6.1f}" for r in runs) + " req/s   "
                  f"p50 {np.mean([r['p50'] for r in runs]):6.1f} ms  p99 {max(r['p99'] for r in runs):6.1f} ms  "
                  f"errors {sum(r['errors'] for r in runs)}")
        mean = {name: float(np.mean([r["rps"] for r in runs])) for name, runs in rounds.items()}
        print(f"  2 replicas / 1 replica (PostgreSQL, same cores): {mean['postgresql, 2 replicas'] / mean['postgresql, 1 replica']:.3f}")
        print(f"  PostgreSQL / SQLite (1 replica):                 {mean['postgresql, 1 replica'] / mean['sqlite, 1 replica']:.3f}")

        print(f"\nenroll-to-visible on the other replica ({len(seen)} enrollments): "
              f"p50 {pct(seen, 50):.1f} ms, p99 {pct(seen, 99):.1f} ms, max {max(seen) * 1e3:.1f} ms")

        print("\nenroll latency, committed")
        print(f"  HTTP, one photo:   SQLite p50 {pct(enroll_sqlite, 50):6.1f} ms   PostgreSQL p50 "
              f"{pct(enroll_pg, 50):6.1f} ms   ratio {pct(enroll_pg, 50) / pct(enroll_sqlite, 50):.2f}")
        lite_commit, pg_commit = store_commit(work / "commit"), store_commit(pg.new_database())
        print(f"  store only (add):  SQLite p50 {pct(lite_commit, 50):6.2f} ms   PostgreSQL p50 "
              f"{pct(pg_commit, 50):6.2f} ms   (p99 {pct(lite_commit, 99):.2f} / {pct(pg_commit, 99):.2f} ms)")

        n = args.cold_examples
        cold_url = pg.new_database()
        pg_seconds = cold(cold_url, n)
        lite_seconds = cold(work / "cold-sqlite", n)
        per = 100_000 / n
        print(f"\ncold start, {n:,} examples of {DIM}-d: index built from PostgreSQL in {pg_seconds:.1f} s "
              f"({pg_seconds * per:.1f} s per 100,000); from SQLite without its snapshot {lite_seconds:.1f} s "
              f"({lite_seconds * per:.1f} s per 100,000)")
        started = time.perf_counter()
        proc, base = serve(every, cache, work / "coldreplica", cold_url)
        ready = time.perf_counter() - started
        built = httpx.get(f"{base}/readyz").json()["galleries"]
        stop(proc)
        print(f"  a replica on that database: ready in {ready:.1f} s, of which building indexes "
              f"{built['build_seconds']:.1f} s ({built['examples']:,} examples)")


if __name__ == "__main__":
    main()
