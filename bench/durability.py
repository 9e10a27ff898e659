"""Crash durability of `fewshot serve`: enroll under load, kill -9 at a random moment, restart, check.

    python bench/durability.py [--trials 30] [--clients 4]

Each trial starts the real server (default encoder) on one data directory, lets ``--clients``
threads enroll small JPEGs into a few classes for a random 0.3-3 s, kills the server with SIGKILL
mid-stream, starts it again and checks that every enrollment that was answered 201 is there under
its label, and that the in-memory index holds exactly the examples SQLite holds. Prints one line per
trial and a total; exits 1 if anything acknowledged was lost.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import photo_jpegs  # noqa: E402
from serve import free_port, start  # noqa: E402


def enroll_until(base: str, images: list[tuple[str, bytes]], clients: int, stop: threading.Event,
                 acknowledged: dict[int, str]) -> None:
    def client(i: int) -> None:
        with httpx.Client(timeout=30) as http:
            k = i
            while not stop.is_set():
                label, data = images[k % len(images)]
                try:
                    r = http.post(f"{base}/v1/galleries/crash/classes/{label}/examples",
                                  files=[("files", ("e.jpg", data, "image/jpeg"))])
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 201:
                    acknowledged.update({i: label for i in r.json()["ids"]})
                k += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join()


def check(base: str, acknowledged: dict[int, str]) -> tuple[int, int, int]:
    """(acknowledged ids missing or relabelled, examples in SQLite, examples in the index)."""
    classes = httpx.get(f"{base}/v1/galleries/crash/classes?limit=1000", timeout=30).json()["classes"]
    stored = {}
    for c in classes:
        stored.update({i: c["label"] for i in httpx.get(f"{base}/v1/galleries/crash/classes/{c['label']}",
                                                        timeout=30).json()["ids"]})
    lost = sum(stored.get(i) != label for i, label in acknowledged.items())
    indexed = next(g["examples"] for g in httpx.get(f"{base}/v1/galleries", timeout=30).json() if g["name"] == "crash")
    return lost, len(stored), indexed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fewshot-durability-"))
    env = {**os.environ, "FEWSHOT_CACHE_DIR": str(work / "cache")}
    images = photo_jpegs(24, size=(160, 120), seed=4)
    rng = random.Random(0)
    acknowledged: dict[int, str] = {}
    port = free_port()
    command = [sys.executable, "-m", "fewshot.cli", "serve", "--port", str(port), "--data-dir", str(work / "data"),
               "--workers", "1"]  # kill -9 of one process is the crash being tested
    base = f"http://127.0.0.1:{port}"
    total_lost = 0
    for trial in range(1, args.trials + 1):
        server = start(command, port, env)
        stop = threading.Event()
        loader = threading.Thread(target=enroll_until, args=(base, images, args.clients, stop, acknowledged))
        before = len(acknowledged)
        loader.start()
        time.sleep(rng.uniform(0.3, 3.0))
        server.send_signal(signal.SIGKILL)
        server.wait()
        stop.set()
        loader.join()
        server = start(command, port, env)
        try:
            lost, stored, indexed = check(base, acknowledged)
        finally:
            server.send_signal(signal.SIGKILL)
            server.wait()
        total_lost += lost
        print(f"trial {trial:2d}: {len(acknowledged) - before:3d} acknowledged this trial, {len(acknowledged):5d} in all; "
              f"after restart SQLite {stored}, index {indexed}, lost {lost}", flush=True)
        if indexed != stored:
            total_lost += 1
    print(f"{args.trials} kill -9 trials, {len(acknowledged)} acknowledged enrollments: {total_lost} lost or "
          f"out of step (target 0)")
    sys.exit(1 if total_lost else 0)


if __name__ == "__main__":
    main()
