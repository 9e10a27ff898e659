"""`fewshot serve --workers 2`: two processes on one port share the galleries of one data directory
(each follows the others' writes through the change log): what one enrolls, the other answers at once."""
from __future__ import annotations

import time

import httpx

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


def test_a_long_lived_connection_is_handed_back_now_and_then_when_there_are_several_workers(tmp_path):
    """With several workers, the RECYCLE_AFTER-th request on one keep-alive connection answers with
    `Connection: close`, so a client pool opened at once does not stay split unevenly; one worker: never."""
    from fastapi.testclient import TestClient

    from fewshot_service.config import Settings
    from fewshot_service.main import RECYCLE_AFTER, create_app

    from .test_service import FakeEncoder

    for workers, closes in ((2, True), (1, False)):
        settings = Settings(data_dir=tmp_path / str(workers), encoders="fake", workers=workers)
        with TestClient(create_app(settings, encoder=FakeEncoder())) as client:
            answers = [client.get("/healthz").headers.get("connection") for _ in range(RECYCLE_AFTER)]
        assert answers[:-1] == [None] * (RECYCLE_AFTER - 1)
        assert (answers[-1] == "close") is closes
