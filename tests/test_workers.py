"""`fewshot serve --workers 2`: two processes on one port share the galleries of one data directory
(each follows the others' writes through the change log): what one enrolls, the other answers at once."""
from __future__ import annotations

import time

import httpx
import numpy as np

from .servers import free_port, start_server
from .test_replicas import crops, files


def test_enroll_through_one_worker_recognise_through_the_other_at_once(tmp_path, encoder, cache_dir):
    port = free_port()
    proc = start_server(tmp_path / "data", port, cache_dir, "--workers", "2")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, workers = time.monotonic() + 60, set()
        while len(workers) < 2:  # both processes up and taking connections
            assert time.monotonic() < deadline, f"only worker(s) {workers} answered"
            workers.add(httpx.get(f"{base}/readyz", timeout=10).headers["x-fewshot-worker"])
        for n, name in enumerate(["coffee", "rocket", "chelsea", "astronaut"]):
            first, other = crops(name, 2, seed=n)
            r = httpx.post(f"{base}/v1/galleries/shop/classes/{name}/examples", **files(first), timeout=30)
            assert r.status_code == 201, r.text
            enrolled_by, seen = r.headers["x-fewshot-worker"], set()
            while len(seen) < 2:  # ask on new connections until the other process has answered too
                assert time.monotonic() < deadline + 60, "the other worker never answered"
                r = httpx.post(f"{base}/v1/galleries/shop/recognize", **files(other), timeout=30)
                assert r.status_code == 200 and r.json()["results"][0]["matches"][0]["label"] == name, \
                    (r.headers["x-fewshot-worker"], enrolled_by, r.text[:300])
                seen.add(r.headers["x-fewshot-worker"])
        metrics = {httpx.get(f"{base}/metrics", timeout=10).text.split('fewshot_worker_info{pid="')[1].split('"')[0]
                   for _ in range(20)}
        assert metrics <= workers  # each process says which one it is
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _hold_a_slot(table: str, load: int, ready, done) -> None:
    """Another worker: claims a slot of ``table`` with ``load`` requests in flight until ``done``."""
    from fewshot_service.balance import Balance

    other = Balance(table)
    for _ in range(load):
        other.begin()
    ready.put(other.slot)
    done.wait(60)


def test_the_busier_worker_hands_connections_back_until_the_loads_even_out(tmp_path):
    """Two workers share a table of their loads: each claims its own slot; a worker holding 2 or more
    requests above the least busy answers `Connection: close` (the client reconnects, to either), and
    never when it is not; a single process has no table and never closes."""
    import multiprocessing

    from fastapi.testclient import TestClient

    from fewshot_service.balance import create_table
    from fewshot_service.config import Settings
    from fewshot_service.main import create_app

    from .test_service import FakeEncoder

    table = create_table(2)
    context = multiprocessing.get_context("spawn")
    ready, done = context.Queue(), context.Event()
    other = context.Process(target=_hold_a_slot, args=(str(table), 0, ready, done))
    other.start()
    try:
        other_slot = ready.get(timeout=60)
        settings = Settings(data_dir=tmp_path / "a", encoders="fake", workers=2, balance_table=table)
        app = create_app(settings, encoder=FakeEncoder())
        with TestClient(app) as client:
            assert client.get("/healthz").headers.get("connection") is None  # as loaded as the other: kept
            with open(table, "r+b") as f:  # this worker holds two requests more (in the shared file)
                f.seek(8 * (1 - other_slot))
                f.write(np.int64(2).tobytes())
            assert client.get("/healthz").headers.get("connection") == "close"
            with open(table, "r+b") as f:  # even again
                f.seek(8 * (1 - other_slot))
                f.write(np.int64(0).tobytes())
            assert client.get("/healthz").headers.get("connection") is None
        one = Settings(data_dir=tmp_path / "b", encoders="fake", workers=1)
        with TestClient(create_app(one, encoder=FakeEncoder())) as client:
            assert all(client.get("/healthz").headers.get("connection") is None for _ in range(70))
    finally:
        done.set()
        other.join(60)
        table.unlink()
