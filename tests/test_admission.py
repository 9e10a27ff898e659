"""Admission control against a live server: past the bound on images in flight or on uploads at once,
503 + Retry-After at once; a body that does not arrive in time, 408; a client that leaves mid-upload,
one line in the log and a client error, never a 500."""
from __future__ import annotations

import logging
import socket
import threading
import time

import httpx
import pytest

from fewshot_service.config import Settings
from fewshot_service.main import create_app

from .conftest import serve_in_thread
from .test_service import COLOURS, FakeEncoder, png


@pytest.fixture
def server(tmp_path, request):
    options = getattr(request, "param", {})
    app = create_app(Settings(data_dir=tmp_path, **options), encoder=FakeEncoder(delay=0.2))
    stop, url = serve_in_thread(app)
    yield app, url
    stop()


def _settles(check, what: str, seconds: float = 5.0) -> None:
    """Wait for ``check()`` with a deadline (a place is given back once the answer has gone out)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _files(n: int = 1) -> list:
    return [("files", (f"{i}.png", png(COLOURS["red"], shade=i), "image/png")) for i in range(n)]


@pytest.mark.parametrize("server", [{"max_images_in_flight": 4, "max_batch_size": 1}], indirect=True)
def test_past_the_images_in_flight_the_answer_is_503_at_once(server):
    app, url = server
    httpx.post(f"{url}/v1/galleries/shop/classes/red/examples", files=_files(), timeout=30).raise_for_status()
    answers = []

    def ask() -> None:
        started = time.monotonic()
        r = httpx.post(f"{url}/v1/galleries/shop/recognize", files=_files(2), timeout=30)
        answers.append((r.status_code, r.headers.get("retry-after"), time.monotonic() - started))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [a for a in answers if a[0] == 503]
    assert {a[0] for a in answers} <= {200, 503} and refused and any(a[0] == 200 for a in answers), answers
    assert all(retry == "1" and seconds < 1.0 for _, retry, seconds in refused), refused  # at once, not queued
    _settles(lambda: app.state.admission.images_in_flight == 0, "an image's place was not given back")


def _raw(url: str, head: bytes, body: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=10)
    conn.sendall(head + body)
    return conn


def _head(length: int) -> bytes:
    return (f"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n\r\n").encode()


@pytest.mark.parametrize("server", [{"body_timeout_s": 0.5}], indirect=True)
def test_a_body_that_does_not_arrive_in_time_is_408(server):
    _, url = server
    conn = _raw(url, _head(10_000), b"--b\r\n")  # and then nothing
    started = time.monotonic()
    answer = conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5, answer[:200]
    conn.close()


@pytest.mark.parametrize("server", [{"max_uploads": 1, "body_timeout_s": 10}], indirect=True)
def test_past_the_uploads_at_once_the_answer_is_503_at_once(server):
    app, url = server
    slow = _raw(url, _head(10_000), b"--b\r\n")  # holds the one upload place
    deadline = time.monotonic() + 5
    while app.state.admission.uploads < 1:
        assert time.monotonic() < deadline, "the slow upload never started"
        time.sleep(0.01)
    started = time.monotonic()
    r = httpx.post(f"{url}/v1/embed", files=_files(), timeout=10)
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and time.monotonic() - started < 1.0
    slow.close()
    deadline = time.monotonic() + 5
    while app.state.admission.uploads:  # the place comes back when the client goes
        assert time.monotonic() < deadline, "the upload place was not given back"
        time.sleep(0.01)
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_a_client_leaving_mid_upload_is_a_client_error_in_one_line(server, caplog):
    app, url = server
    with caplog.at_level(logging.INFO, logger="fewshot.service"):
        for _ in range(5):
            conn = _raw(url, _head(100_000), b"--b\r\nContent-Disposition: form-data; name=\"files\"; "
                                              b"filename=\"a.png\"\r\n\r\n" + b"x" * 1000)
            conn.close()
        deadline = time.monotonic() + 5
        while sum("went away" in r.getMessage() for r in caplog.records) < 5:
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.02)
    metrics = httpx.get(f"{url}/metrics").text
    assert 'status="500"' not in metrics and 'fewshot_rejected_requests_total{status="400"}' in metrics
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the log"
    _settles(lambda: app.state.admission.uploads == 0 and app.state.admission.images_in_flight == 0,
             "a place was not given back")


@pytest.mark.parametrize("server", [{"max_bytes_in_flight": 20_000, "body_timeout_s": 10}], indirect=True)
def test_past_the_bytes_held_the_answer_is_503_at_once(server):
    app, url = server
    slow = _raw(url, _head(15_000), b"--b\r\n")  # declares 15 kB and holds them
    deadline = time.monotonic() + 5
    while app.state.admission.bytes_held < 15_000:
        assert time.monotonic() < deadline, "the slow upload never started"
        time.sleep(0.01)
    files = [("files", ("big.png", png(COLOURS["red"], size=(200, 200)) + b"\0" * 8000, "image/png"))]
    started = time.monotonic()
    r = httpx.post(f"{url}/v1/embed", files=files, timeout=10)
    assert r.status_code == 503 and "bytes of requests are held" in r.json()["error"]["message"]
    assert time.monotonic() - started < 1.0
    slow.close()
    deadline = time.monotonic() + 5
    while app.state.admission.bytes_held:
        assert time.monotonic() < deadline, "the bytes were not given back"
        time.sleep(0.01)
    assert httpx.post(f"{url}/v1/embed", files=_files(), timeout=10).status_code == 200
