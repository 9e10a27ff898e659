"""A PostgreSQL outage under load on two replicas, as the test and the benchmark both run it.

4 clients enroll (2 per replica) and 4 recognise (2 per replica) while the database is stopped for
``outage`` seconds and started again; every request is recorded with when it started, how long it
took, its status and its Retry-After. ``run`` returns once every enrolling client has had a write
accepted after the database came back (or ``recover`` seconds passed).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from .conftest import jpeg_bytes, photo

CLIENTS = 2  # of each kind, per replica


@dataclass
class Call:
    kind: str  # "enroll" or "recognize"
    replica: int
    started: float  # time.monotonic()
    seconds: float
    status: int
    retry_after: str | None
    label: str | None = None  # recognise: the top label
    ids: list[int] = field(default_factory=list)  # enroll: the acknowledged ids


@dataclass
class Outage:
    calls: list[Call]
    stopped: float  # when the database was stopped
    back: float  # when it was started again (pg_ctl -w returned: accepting connections)

    def during(self, kind: str) -> list[Call]:
        """Calls of ``kind`` started while the database was away."""
        return [c for c in self.calls if c.kind == kind and self.stopped <= c.started < self.back]

    def recovered_after(self) -> list[float]:
        """Per replica: seconds from the database's return to the first write accepted that started after it."""
        out = []
        for replica in sorted({c.replica for c in self.calls}):
            firsts = [c.started + c.seconds - self.back for c in self.calls if c.kind == "enroll" and
                      c.replica == replica and c.status == 201 and c.started >= self.back]
            out.append(min(firsts) if firsts else float("inf"))
        return out

    def acknowledged(self) -> set[int]:
        return {i for c in self.calls if c.kind == "enroll" and c.status == 201 for i in c.ids}


def crops(name: str, n: int, seed: int) -> list[bytes]:
    """n different JPEGs of one photo (random crops): distinct examples of one class."""
    image, rng = photo(name), np.random.default_rng(seed)
    w, h = image.size
    out = []
    for _ in range(n):
        cw, ch = int(w * rng.uniform(0.6, 0.9)), int(h * rng.uniform(0.6, 0.9))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out.append(jpeg_bytes(image.crop((x, y, x + cw, y + ch)), (224, 224)))
    return out


def _files(image: bytes) -> dict:
    return {"files": [("files", ("0.jpg", image, "image/jpeg"))]}


def run(bases: list[str], postgres, gallery: str, known: bytes, images: list[bytes], warm: float = 1.0,
        outage: float = 8.0, recover: float = 10.0) -> Outage:
    """Load both replicas (``bases``), stop ``postgres`` for ``outage`` s, start it, wait for recovery."""
    calls: list[Call] = []
    stop = threading.Event()
    pending = iter(images)
    lock = threading.Lock()

    def timed(kind: str, replica: int, client: httpx.Client, path: str, image: bytes) -> Call:
        started = time.monotonic()
        try:
            r = client.post(path, **_files(image))
            status, retry, body = r.status_code, r.headers.get("retry-after"), r.json()
        except httpx.HTTPError:
            status, retry, body = 0, None, {}
        call = Call(kind, replica, started, time.monotonic() - started, status, retry)
        if kind == "recognize" and status == 200 and body["results"]:
            call.label = body["results"][0]["matches"][0]["label"]
        if kind == "enroll" and status == 201:
            call.ids = body["ids"]
        with lock:
            calls.append(call)
        return call

    def enroll(replica: int) -> None:
        with httpx.Client(base_url=bases[replica], timeout=30) as client:
            while not stop.is_set():
                with lock:
                    image = next(pending, None)
                if image is None:
                    return
                timed("enroll", replica, client, f"/v1/galleries/{gallery}/classes/astronaut/examples", image)

    def recognize(replica: int) -> None:
        with httpx.Client(base_url=bases[replica], timeout=30) as client:
            while not stop.is_set():
                timed("recognize", replica, client, f"/v1/galleries/{gallery}/recognize", known)

    threads = [threading.Thread(target=work, args=(replica,)) for replica in range(len(bases))
               for work in (enroll, recognize) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        time.sleep(warm)  # the load runs for a fixed while first: these are the phases being measured
        stopped = time.monotonic()
        postgres.stop("fast")
        time.sleep(outage)
        postgres.start()
        back = time.monotonic()
        result = Outage(calls, stopped, back)
        deadline = back + recover
        while time.monotonic() < deadline and max(result.recovered_after()) == float("inf"):
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return Outage(sorted(calls, key=lambda c: c.started), stopped, back)
