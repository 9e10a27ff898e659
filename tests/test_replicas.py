"""Two `fewshot serve` processes on one PostgreSQL database are one service: enroll through either,
recognise through either, nothing lost when a replica is killed -9, when both enroll into one class at
once, or when the database restarts under load (503 + Retry-After meanwhile, then recovery by itself)."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from . import outage
from .outage import crops
from .servers import free_port, start_server

NAMES = ["chelsea", "astronaut", "coffee", "rocket", "camera"]


def until(check, seconds: float, what: str) -> None:
    """Poll ``check()`` until it is true; fail with ``what`` (and the last value) after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} after {seconds} s: {value}"
        time.sleep(0.01)


def files(*images: bytes) -> dict:
    return {"files": [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]}


class Replica:
    def __init__(self, tmp, cache_dir, url: str, name: str) -> None:
        self.tmp, self.cache_dir, self.url_db, self.name = tmp, cache_dir, url, name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        self.proc = start_server(self.tmp / self.name, self.port, self.cache_dir, "--database-url", self.url_db)
        self.http = httpx.Client(base_url=self.base, timeout=30)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.http.close()

    def top(self, gallery: str, image: bytes) -> tuple[int, str | None]:
        r = self.http.post(f"/v1/galleries/{gallery}/recognize", **files(image))
        return r.status_code, (r.json()["results"][0]["matches"][0]["label"] if r.status_code == 200 else None)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, postgres, encoder, cache_dir):
    """Two replicas on one fresh database (``encoder`` first: its ONNX export is cached for them)."""
    tmp = tmp_path_factory.mktemp("replicas")
    url = postgres.new_database()
    a, b = Replica(tmp, cache_dir, url, "a"), Replica(tmp, cache_dir, url, "b")
    yield a, b
    for replica in (a, b):
        replica.kill()


def test_enrolled_on_one_replica_recognised_on_the_other_within_a_second(replicas):
    a, b = replicas
    images = {name: crops(name, 2, seed=1) for name in NAMES[:3]}
    for name, (first, _) in images.items():
        assert a.http.post(f"/v1/galleries/shop/classes/{name}/examples", **files(first)).status_code == 201
        until(lambda: b.top("shop", first) == (200, name), 1.0,  # the same photo: its own class, surely
              f"{name} not visible on the other replica")
    for name, (_, other) in images.items():  # another crop: the other replica's index really holds the class
        assert b.top("shop", other) == (200, name)
    assert [c["label"] for c in b.http.get("/v1/galleries/shop/classes").json()["classes"]] == sorted(NAMES[:3])
    assert "shop" in [g["name"] for g in b.http.get("/v1/galleries").json()]


def test_both_replicas_enrolling_into_one_class_at_once_lose_nothing(replicas):
    a, b = replicas
    images = crops("rocket", 24, seed=2)
    acknowledged, failures = [], []

    def enroll(replica: Replica, mine: list[bytes]) -> None:
        for image in mine:
            r = replica.http.post("/v1/galleries/busy/classes/rocket/examples", **files(image))
            (acknowledged if r.status_code == 201 else failures).append(r.status_code)

    threads = [threading.Thread(target=enroll, args=(replica, images[i::4]))
               for i, replica in enumerate([a, b, a, b])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and len(acknowledged) == 24
    assert len(set(b.http.get("/v1/galleries/busy/classes/rocket").json()["ids"])) == 24  # the database
    for replica in (a, b):  # and each replica's index in memory
        until(lambda: 'fewshot_gallery_examples{gallery="busy"} 24' in replica.http.get("/metrics").text, 2,
              "24 examples not in the replica's index")


def test_kill_9_of_a_replica_loses_no_acknowledged_enrollment(replicas):
    a, b = replicas
    images = crops("camera", 200, seed=3)
    acknowledged: list[int] = []

    def enroll() -> None:
        for image in images:
            try:
                r = a.http.post("/v1/galleries/durable/classes/camera/examples", **files(image))
            except httpx.HTTPError:
                return  # killed
            if r.status_code == 201:
                acknowledged.extend(r.json()["ids"])

    writer = threading.Thread(target=enroll)
    writer.start()
    until(lambda: len(acknowledged) >= 10, 60, "fewer than 10 enrollments acknowledged")
    a.kill()
    writer.join()
    assert len(acknowledged) >= 10
    stored = set(b.http.get("/v1/galleries/durable/classes/camera").json()["ids"])
    assert set(acknowledged) <= stored
    a.start()  # and the killed replica comes back with all of it, built from the database
    assert set(acknowledged) <= set(a.http.get("/v1/galleries/durable/classes/camera").json()["ids"])
    ready = a.http.get("/readyz").json()["galleries"]
    assert ready["store"] == "postgresql" and ready["examples"] >= len(acknowledged)


def test_a_database_outage_under_load_keeps_queries_answering_and_writes_bounded(replicas, postgres):
    """4 clients enroll and 4 recognise through two replicas while PostgreSQL is stopped for 8 s: every
    recognise answers 200 (the right class) within 1 s, every write 201 or 503 + Retry-After within
    3.5 s, writes succeed again within 5 s of the database's return, and nothing acknowledged is lost."""
    a, b = replicas
    known = crops("coffee", 1, seed=4)[0]
    assert a.http.post("/v1/galleries/faults/classes/coffee/examples", **files(known)).status_code == 201
    assert a.http.post("/v1/galleries/faults/classes/chelsea/examples", **files(crops("chelsea", 1, 5)[0])).status_code == 201
    until(lambda: b.top("faults", known) == (200, "coffee"), 2, "coffee not visible on the other replica")
    result = outage.run([a.base, b.base], postgres, "faults", known, crops("astronaut", 600, seed=6))
    queries, writes = result.during("recognize"), result.during("enroll")
    assert len(queries) > 20 and len(writes) >= 4, (len(queries), len(writes))
    slow = [(c.status, round(c.seconds, 2)) for c in queries if c.status != 200 or c.seconds >= 1.0]
    assert not slow, f"queries during the outage that were not 200 within 1 s: {slow[:10]}"
    assert all(c.label == "coffee" for c in result.calls if c.kind == "recognize"), "a wrong answer"
    bad = [(c.status, c.retry_after, round(c.seconds, 2)) for c in result.calls if c.kind == "enroll" and
           not (c.status == 201 or (c.status == 503 and c.retry_after)) or c.kind == "enroll" and c.seconds > 3.5]
    assert not bad, f"writes that were not 201, or 503 with Retry-After, within 3.5 s: {bad[:10]}"
    assert any(c.status == 503 for c in writes), "the outage was not noticed: no write failed"
    assert max(result.recovered_after()) <= 5.0, f"writes accepted again after {result.recovered_after()} s"
    acknowledged = result.acknowledged()
    for replica in (a, b):
        until(lambda: acknowledged <= set(replica.http.get("/v1/galleries/faults/classes/astronaut").json()["ids"]),
              5, "an acknowledged enrollment is missing")


def test_bad_input_on_a_replica_is_a_4xx_and_changes_nothing(replicas):
    a, b = replicas
    image = crops("chelsea", 1, seed=7)[0]
    assert a.http.post("/v1/galleries/strict/classes/cat/examples", **files(image)).status_code == 201
    before = b.http.get("/v1/galleries/strict/classes").json()
    for path, body, status in [
        ("/v1/galleries/strict/classes/" + "x" * 201 + "/examples", files(image), 400),  # label too long
        ("/v1/galleries/strict/classes/dog/examples", files(b"not an image"), 400),
        ("/v1/galleries/strict/recognize/embedding", {"content": b'{"vectors": [[NaN, 0, 1]]}',
                                                      "headers": {"content-type": "application/json"}}, 400),
    ]:
        r = a.http.post(path, **body)
        assert r.status_code == status and r.json()["error"]["message"], r.text
    version = a.http.get("/v1/galleries/strict").json()["version"]  # B has seen all A did: then compare
    until(lambda: b.http.get("/v1/galleries/strict").json()["version"] == version, 5, "B behind A")
    assert b.http.get("/v1/galleries/strict/classes").json() == before
    assert a.http.get("/v1/galleries/strict/classes").json() == before
