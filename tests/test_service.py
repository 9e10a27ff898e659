"""The REST service through the front door: a fake encoder injected into create_app."""
from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fewshot.images import Instance, decode_image
from fewshot_service.config import Settings
from fewshot_service.main import create_app

COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


class FakeEncoder:
    """Pixels are the 8x8 thumbnail; the vector is (mostly) a one-hot of the dominant colour."""

    name, fingerprint, dim, input_shape = "fake", "fake-fp", 3, (3, 8, 8)
    max_bytes, max_pixels = 1_000_000, 4_000_000

    def __init__(self, delay: float = 0.0) -> None:
        self.batch_sizes: list[int] = []
        self.delay = delay

    finds_faces = False

    def preprocess(self, data: bytes | Image.Image) -> np.ndarray:
        image = data if isinstance(data, Image.Image) else decode_image(data, self.max_bytes, self.max_pixels)
        return np.asarray(image.resize((8, 8))).transpose(2, 0, 1).copy()

    def instances(self, data: bytes | Image.Image) -> list[Instance]:
        return [Instance(self.preprocess(data), (0, 0, 1, 1))]

    def embed(self, batch: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(len(batch))
        time.sleep(self.delay)
        mean = batch.reshape(len(batch), 3, -1).mean(axis=2)
        colour = mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-6)
        rows = 0.2 * colour + np.eye(3)[mean.argmax(axis=1)]
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def png(colour, size=(32, 32), shade: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, tuple(max(0, c - shade) for c in colour)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def client(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, max_images_per_request=4, max_vectors_per_request=8,
                              max_vector_request_bytes=64_000), encoder=FakeEncoder())
    with TestClient(app) as c:
        yield c


def enroll(client, label, *images, gallery="shop"):
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return client.post(f"/v1/galleries/{gallery}/classes/{label}/examples", files=files)


@pytest.fixture
def stocked(client):
    for name, colour in COLOURS.items():
        assert enroll(client, name, png(colour), png(colour, shade=40)).status_code == 201
    return client


def test_enroll_recognize_verify(stocked):
    r = stocked.post("/v1/galleries/shop/recognize?k=2", files=[("files", ("q.png", png((200, 30, 30)), "image/png"))])
    assert r.status_code == 200
    result = r.json()["results"][0]
    assert result["matches"][0]["label"] == "red" and not result["unknown"] and result["threshold"] is not None
    same = [("files", ("q.png", png(COLOURS["red"]), "image/png"))]  # an enrolled red: an impostor for blue
    v = stocked.post("/v1/galleries/shop/verify?label=blue", files=same)
    assert v.status_code == 200 and v.json()["match"] is False and v.json()["score"] < v.json()["threshold"]
    assert stocked.post("/v1/galleries/shop/verify?label=red", files=same).json()["match"] is True


def test_json_base64_images_and_embed(stocked):
    body = {"images": [base64.b64encode(png(COLOURS["green"])).decode()]}
    r = stocked.post("/v1/galleries/shop/recognize", json=body)
    assert r.json()["results"][0]["matches"][0]["label"] == "green"
    e = stocked.post("/v1/embed?encoding=base64", json=body).json()
    row = np.frombuffer(base64.b64decode(e["embeddings_base64"][0]), "<f4")
    assert e["dim"] == 3 and row.argmax() == 1 and abs(np.linalg.norm(row) - 1) < 1e-5
    assert len(stocked.post("/v1/embed", json=body).json()["embeddings"][0]) == 3


def test_recognize_embedding_and_class_management(stocked):
    r = stocked.post("/v1/galleries/shop/recognize/embedding", json={"vectors": [[0, 0, 1]], "k": 1})
    assert r.json()["results"][0]["matches"][0]["label"] == "blue"
    assert stocked.get("/v1/galleries").json() == [{"name": "shop", "encoder": "fake", "examples": 6}]
    page = stocked.get("/v1/galleries/shop/classes?limit=2").json()
    assert page["total"] == 3 and [c["label"] for c in page["classes"]] == ["blue", "green"]
    red = stocked.get("/v1/galleries/shop/classes/red").json()
    assert red["count"] == 2 and len(red["ids"]) == 2
    assert stocked.patch("/v1/galleries/shop/classes/red", json={"label": "crimson"}).json()["label"] == "crimson"
    assert stocked.delete(f"/v1/galleries/shop/examples/{red['ids'][0]}").json() == {"removed": 1}
    assert stocked.delete("/v1/galleries/shop/classes/crimson").json() == {"removed": 1}
    assert [c["label"] for c in stocked.get("/v1/galleries/shop/classes").json()["classes"]] == ["blue", "green"]


def bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buffer, "PNG")
    return buffer.getvalue()


def upload(data: bytes, name="x.png", kind="image/png"):
    return {"files": [("files", (name, data, kind))]}


BAD = [  # (name, method, path, request kwargs, status, words in the message)
    ("not an image", "post", "/v1/galleries/shop/classes/red/examples", upload(b"hello world"), 400, "not an image"),
    ("truncated", "post", "/v1/galleries/shop/classes/red/examples", upload(png((1, 2, 3))[:60]), 400, "image"),
    ("zero bytes", "post", "/v1/galleries/shop/classes/red/examples", upload(b""), 400, "empty"),
    ("too large", "post", "/v1/galleries/shop/classes/red/examples", upload(b"\xff" * 1_000_001), 413, "limit"),
    ("bomb", "post", "/v1/galleries/shop/classes/red/examples", upload(bomb()), 413, "pixels"),
    ("too many images", "post", "/v1/galleries/shop/classes/red/examples",
     {"files": [("files", (f"{i}.png", png((9, 9, 9)), "image/png")) for i in range(5)]}, 413, "limit"),
    ("wrong content type", "post", "/v1/galleries/shop/classes/red/examples",
     {"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
    ("malformed json", "post", "/v1/galleries/shop/recognize",
     {"content": b"{nope", "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
    ("bad base64", "post", "/v1/galleries/shop/recognize", {"json": {"images": ["***"]}}, 400, "base64"),
    ("no images", "post", "/v1/galleries/shop/recognize", {"json": {"images": []}}, 400, "no image"),
    ("unknown gallery", "post", "/v1/galleries/nowhere/recognize", upload(png((9, 9, 9))), 404, "no gallery"),
    ("bad gallery name", "post", "/v1/galleries/..bad/recognize", upload(png((9, 9, 9))), 400, "gallery name"),
    ("unknown class", "get", "/v1/galleries/shop/classes/kiwi", {}, 404, "no class"),
    ("unknown class delete", "delete", "/v1/galleries/shop/classes/kiwi", {}, 404, "no class"),
    ("unknown example", "delete", "/v1/galleries/shop/examples/999", {}, 404, "no example"),
    ("rename onto existing", "patch", "/v1/galleries/shop/classes/red", {"json": {"label": "blue"}}, 409, "exists"),
    ("wrong dimension", "post", "/v1/galleries/shop/recognize/embedding", {"json": {"vectors": [[1, 0]]}}, 400,
     "shape"),
    ("NaN vector", "post", "/v1/galleries/shop/recognize/embedding",
     {"content": b'{"vectors": [[NaN, 0, 1]]}', "headers": {"content-type": "application/json"}}, 400, "NaN"),
    ("empty label", "post", "/v1/galleries/shop/classes/%20/examples", upload(png((9, 9, 9))), 400, "empty"),
    ("control char label", "post", "/v1/galleries/shop/classes/a%01b/examples", upload(png((9, 9, 9))), 400,
     "control"),
    ("over-long label", "post", f"/v1/galleries/shop/classes/{'x' * 201}/examples", upload(png((9, 9, 9))), 400,
     "at most"),
    ("bad k", "post", "/v1/galleries/shop/recognize?k=0", upload(png((9, 9, 9))), 422, "k"),
    ("bad head", "post", "/v1/galleries/shop/recognize?head=svm", upload(png((9, 9, 9))), 422, "'prototype', 'knn' or 'cache'"),
    ("verify two images", "post", "/v1/galleries/shop/verify?label=red",
     {"files": [("files", (f"{i}.png", png((9, 9, 9)), "image/png")) for i in range(2)]}, 400, "exactly one"),
    ("gallery name with a newline", "post", "/v1/galleries/shop%0A/classes/red/examples", upload(png((9, 9, 9))),
     400, "gallery name"),
    ("threshold nan", "post", "/v1/galleries/shop/recognize?threshold=nan", upload(png((9, 9, 9))), 400,
     "threshold must be a finite number"),
    ("threshold inf on vectors", "post", "/v1/galleries/shop/recognize/embedding",
     {"content": b'{"vectors": [[0, 0, 1]], "threshold": Infinity}', "headers": {"content-type": "application/json"}},
     400, "threshold must be a finite number"),
    ("far 1e-300", "post", "/v1/galleries/shop/recognize?far=1e-300", upload(png((9, 9, 9))), 400,
     "far (false-accept rate) must be a number from 1e-06 to 0.5"),
    ("far 1 on verify", "post", "/v1/galleries/shop/verify?label=red&far=1", upload(png((9, 9, 9))), 400, "far"),
    ("far nan on vectors", "post", "/v1/galleries/shop/recognize/embedding",
     {"content": b'{"vectors": [[0, 0, 1]], "far": NaN}', "headers": {"content-type": "application/json"}}, 400,
     "far"),
    ("ragged vectors", "post", "/v1/galleries/shop/recognize/embedding", {"json": {"vectors": [[0, 0, 1], [1, 0]]}},
     400, "same length"),
    ("README placeholder", "post", "/v1/galleries/shop/recognize/embedding",
     {"content": b'{"vectors": [[0.1, ...]]}', "headers": {"content-type": "application/json"}}, 400,
     "malformed JSON body at character 19"),
    ("JSON nested 100,000 deep, images", "post", "/v1/galleries/shop/recognize",
     {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}}, 400, "JSON"),
    ("JSON nested 20,000 deep, vectors", "post", "/v1/galleries/shop/recognize/embedding",
     {"content": b'{"vectors": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
      "headers": {"content-type": "application/json"}}, 400, "body"),
    ("example id past SQLite's integers", "delete", "/v1/galleries/shop/examples/1180591620717411303424", {}, 422,
     "less than or equal to 9223372036854775807"),
    ("too many vectors", "post", "/v1/galleries/shop/recognize/embedding", {"json": {"vectors": [[0, 0, 1]] * 9}},
     413, "limit is 8"),
    ("vector body over its byte limit", "post", "/v1/galleries/shop/recognize/embedding",
     {"json": {"vectors": [[0.123456789] * 3] * 4000}}, 413, "limit"),
]


@pytest.mark.parametrize("name, method, path, kwargs, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx_and_changes_nothing(stocked, name, method, path, kwargs, status, words):
    before = stocked.get("/v1/galleries/shop/classes").json()
    r = getattr(stocked, method)(path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert words.lower() in body["error"]["message"].lower(), body
    assert "Traceback" not in r.text and "/work" not in r.text and ".py" not in r.text
    assert stocked.get("/v1/galleries/shop/classes").json() == before
    assert stocked.get("/healthz").status_code == 200  # still serving


@pytest.mark.parametrize("label, data", [("fine", b"not an image"), ("bad%01label", None)])
def test_a_failed_first_enrollment_creates_no_gallery(client, label, data):
    r = client.post(f"/v1/galleries/fresh/classes/{label}/examples", **upload(data or png((9, 9, 9))))
    assert r.status_code == 400
    assert client.get("/v1/galleries").json() == []


def test_chunked_upload_over_the_limit_is_413(tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path, max_request_bytes=50_000), encoder=FakeEncoder())) as c:
        def chunks():
            for _ in range(20):
                yield b"x" * 10_000

        r = c.post("/v1/embed", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        assert c.get("/healthz").status_code == 200


def test_api_keys(tmp_path):
    settings = Settings(data_dir=tmp_path, admin_key="admin-secret", read_key="read-secret")
    with TestClient(create_app(settings, encoder=FakeEncoder())) as c:
        image = upload(png(COLOURS["red"]))
        assert c.post("/v1/galleries/g/classes/red/examples", **image).status_code == 401
        assert c.post("/v1/galleries/g/classes/red/examples", headers={"X-API-Key": "read-secret"},
                      **image).status_code == 403
        assert c.post("/v1/galleries/g/classes/red/examples", headers={"Authorization": "Bearer admin-secret"},
                      **image).status_code == 201
        assert c.get("/v1/galleries/g/classes").status_code == 401
        assert c.get("/v1/galleries/g/classes", headers={"X-API-Key": "read-secret"}).status_code == 200
        assert c.get("/v1/galleries/g/classes", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/metrics").status_code == 401  # gallery names are data
        assert 'gallery="g"' in c.get("/metrics", headers={"X-API-Key": "read-secret"}).text
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_a_read_key_alone_is_refused_at_start(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="FEWSHOT_ADMIN_KEY"):
        Settings(data_dir=tmp_path, read_key="read-secret")
    run = subprocess.run([sys.executable, "-m", "fewshot.cli", "serve", "--port", "1"], capture_output=True,
                         text=True, env={**os.environ, "FEWSHOT_READ_KEY": "r"}, timeout=60)
    assert run.returncode == 2 and "Set FEWSHOT_ADMIN_KEY too" in run.stderr and "Traceback" not in run.stderr


def test_an_admin_key_alone_guards_every_route_but_health(tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path, admin_key="admin-secret"), encoder=FakeEncoder())) as c:
        admin = {"X-API-Key": "admin-secret"}
        assert c.post("/v1/galleries/g/classes/red/examples", headers=admin,
                      **upload(png(COLOURS["red"]))).status_code == 201
        writes = [("post", "/v1/galleries/g/classes/blue/examples", upload(png(COLOURS["blue"]))),
                  ("patch", "/v1/galleries/g/classes/red", {"json": {"label": "crimson"}}),
                  ("delete", "/v1/galleries/g/classes/red", {}), ("delete", "/v1/galleries/g/examples/1", {}),
                  ("post", "/v1/galleries/g/adapt", {}), ("delete", "/v1/galleries/g/adapter", {})]
        for method, path, kwargs in writes:
            assert getattr(c, method)(path, **kwargs).status_code == 401, path
            assert getattr(c, method)(path, headers={"X-API-Key": "guess"}, **kwargs).status_code == 403, path
        assert c.get("/v1/galleries/g/classes").status_code == 401 and c.get("/metrics").status_code == 401
        assert c.get("/v1/galleries/g/classes", headers=admin).json()["classes"] == [{"label": "red", "count": 1}]
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_adapt_jobs_beyond_the_limit_get_429_with_retry_after(tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path, max_adapt_jobs=0), encoder=FakeEncoder())) as c:
        enroll(c, "red", png(COLOURS["red"]), gallery="g")
        r = c.post("/v1/galleries/g/adapt")
        assert r.status_code == 429 and r.headers["retry-after"] and "limit" in r.json()["error"]["message"]
        assert c.get("/v1/galleries/g/adapt").json()["status"] == "none"  # nothing started


def test_galleries_past_the_open_limit_are_closed_and_reopen_on_use(tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path, max_open_galleries=1), encoder=FakeEncoder())) as c:
        for gallery, colour in [("one", "red"), ("two", "green"), ("three", "blue")]:
            assert enroll(c, colour, png(COLOURS[colour]), gallery=gallery).status_code == 201
        assert len(c.app.state.store.opened()) == 1
        assert [g["name"] for g in c.get("/v1/galleries").json()] == ["one", "three", "two"]
        for gallery, colour in [("one", "red"), ("two", "green"), ("three", "blue")]:
            r = c.post(f"/v1/galleries/{gallery}/recognize", **upload(png(COLOURS[colour])))
            assert r.json()["results"][0]["matches"][0]["label"] == colour
        assert len(c.app.state.store.opened()) == 1 and len(c.app.state.recognizers) <= 1


def test_concurrent_requests_share_forward_passes(tmp_path):
    spy = FakeEncoder(delay=0.03)
    with TestClient(create_app(Settings(data_dir=tmp_path), encoder=spy)) as c:
        assert enroll(c, "red", png(COLOURS["red"]), gallery="g").status_code == 201
        spy.batch_sizes.clear()
        image = upload(png(COLOURS["red"]))
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda _: c.post("/v1/galleries/g/recognize", **image).status_code, range(16)))
        assert codes == [200] * 16
        assert sum(spy.batch_sizes) == 16 and len(spy.batch_sizes) < 16
        metrics = c.get("/metrics").text
        assert "fewshot_batch_size_bucket" in metrics and 'fewshot_gallery_examples{gallery="g"} 1' in metrics
        assert 'route="/v1/galleries/{gallery}/recognize"' in metrics


def test_readyz_reports_the_encoder(client):
    ready = client.get("/readyz").json()
    galleries = ready.pop("galleries")
    assert galleries == {"store": "sqlite", "open": 0, "examples": 0, "build_seconds": galleries["build_seconds"]}
    assert ready == {"status": "ready", "encoder": "fake", "fingerprint": "fake-fp", "encoders": {
        "fake": {"fingerprint": "fake-fp", "dim": 3}, "efficientnet_lite0": {"loaded": False},
        "face": {"loaded": False}, "face:cnn": {"loaded": False}}}


def test_openapi_docs(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/galleries/{gallery}/recognize" in paths and "/v1/embed" in paths




def test_adapt_job_runs_in_the_background_and_reports(stocked):
    r = stocked.post("/v1/galleries/shop/adapt")
    assert r.status_code == 202 and r.json()["status"] == "running"
    deadline = time.monotonic() + 60
    while (job := stocked.get("/v1/galleries/shop/adapt").json())["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job["status"] == "done" and "reason" in job["report"], job
    # 3 classes x 2 examples: too few to hold any out, so the guard keeps the frozen head and says why
    assert job["report"]["adopted"] is False and "not enough examples" in job["report"]["reason"]
    assert stocked.post("/v1/galleries/nowhere/adapt").status_code == 404
    assert stocked.delete("/v1/galleries/shop/adapter").json()["status"] == "none"


def test_an_adopted_adapter_is_used_and_kept_across_restarts(tmp_path):
    from fewshot.adapt import Adapter
    from fewshot.recognize import Recognizer

    settings = Settings(data_dir=tmp_path)
    query = {"vectors": [[0.3, 0.0, 0.95]], "k": 1}  # mostly blue, a little red

    def best(c) -> str:
        return c.post("/v1/galleries/g/recognize/embedding", json=query).json()["results"][0]["matches"][0]["label"]

    with TestClient(create_app(settings, encoder=FakeEncoder())) as c:
        for name, colour in COLOURS.items():
            enroll(c, name, png(colour), gallery="g")
        assert best(c) == "blue" and c.get("/v1/galleries/g/adapt").json()["status"] == "none"
        shrink_blue = np.diag([0.0, 0.0, -0.9]).astype(np.float32)  # x + xW keeps a tenth of the blue axis
        Recognizer(c.app.state.store.get("g")).set_adapter(Adapter(shrink_blue))  # stored in the gallery
        assert best(c) == "red"  # queries and examples both go through the adapter
    with TestClient(create_app(settings, encoder=FakeEncoder())) as c:
        assert c.get("/v1/galleries/g/adapt").json()["status"] == "adopted" and best(c) == "red"
        assert c.delete("/v1/galleries/g/adapter").status_code == 200
        assert best(c) == "blue"


def test_kept_images_follow_their_examples_and_survive_a_restart(tmp_path):
    red, blue = png(COLOURS["red"], size=(400, 300)), png(COLOURS["blue"])
    with TestClient(create_app(Settings(data_dir=tmp_path), encoder=FakeEncoder())) as c:
        ids = enroll(c, "red", red, gallery="g").json()["ids"] + enroll(c, "blue", blue, gallery="g").json()["ids"]
    with TestClient(create_app(Settings(data_dir=tmp_path), encoder=FakeEncoder())) as c:  # a restart
        original = c.get(f"/v1/galleries/g/examples/{ids[0]}/image")
        assert original.status_code == 200 and original.content == red and original.headers["content-type"] == "image/png"
        small = c.get(f"/v1/galleries/g/examples/{ids[0]}/thumbnail")
        assert small.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(small.content)).size == (160, 120)
        assert c.delete(f"/v1/galleries/g/examples/{ids[0]}").status_code == 200
        gone = c.get(f"/v1/galleries/g/examples/{ids[0]}/image")
        assert gone.status_code == 404 and "no example" in gone.json()["error"]["message"]
        assert c.delete("/v1/galleries/g/classes/blue").status_code == 200
        assert c.get(f"/v1/galleries/g/examples/{ids[1]}/thumbnail").status_code == 404
        assert c.get(f"/v1/galleries/g/examples/{ids[1]}/sketch").status_code == 422


@pytest.mark.parametrize("keep, image, thumb", [("thumbnail", 404, 200), ("none", 404, 404)])
def test_what_is_kept_of_images_is_a_setting(tmp_path, keep, image, thumb):
    with TestClient(create_app(Settings(data_dir=tmp_path, keep_images=keep), encoder=FakeEncoder())) as c:
        (i,) = enroll(c, "red", png(COLOURS["red"]), gallery="g").json()["ids"]
        r = c.get(f"/v1/galleries/g/examples/{i}/image")
        assert r.status_code == image and "FEWSHOT_KEEP_IMAGES" in r.json()["error"]["message"]
        assert c.get(f"/v1/galleries/g/examples/{i}/thumbnail").status_code == thumb
