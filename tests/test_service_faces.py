"""Face galleries in the service, beside object galleries: each gallery chooses its encoder; every
face of a photo is answered with its box; strangers come back unknown; bad input gets a clear 4xx."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fewshot import create_encoder
from fewshot_service.config import Settings
from fewshot_service.main import create_app

from .conftest import SHARED_DATA, jpeg_bytes, photo
from .test_service import COLOURS, FakeEncoder, png, upload

pytest.importorskip("dlib", reason="the face extra is not installed: pip install -e '.[face]'")
FACES = SHARED_DATA / "faces" / "att_faces.zip"
needs_faces = pytest.mark.skipif(not FACES.is_file(), reason=f"real faces data absent: {FACES}")


def orl(person: int, shot: int) -> bytes:
    with zipfile.ZipFile(FACES) as z:
        return z.read(f"att_faces/s{person}/{shot}.pgm")


def group(*people: tuple[int, float]) -> bytes:
    """ORL faces side by side on a grey canvas, each scaled: a small 'group photo'."""
    faces = [Image.open(io.BytesIO(orl(p, 1))).convert("RGB") for p, _ in people]
    faces = [f.resize((int(92 * s), int(112 * s))) for f, (_, s) in zip(faces, people)]
    canvas = Image.new("RGB", (sum(f.width for f in faces) + 40 * len(faces), 220), (120, 120, 120))
    x = 20
    for f in faces:
        canvas.paste(f, (x, 10))
        x += f.width + 40
    return jpeg_bytes(canvas, quality=95)


@pytest.fixture(scope="module")
def client(tmp_path_factory, cache_dir):
    face = create_encoder("face", device="cpu", runtime="onnx", cache_dir=cache_dir)
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), encoders="fake,face")
    with TestClient(create_app(settings, encoders={"fake": FakeEncoder(), "face": face})) as c:
        yield c


def test_galleries_choose_their_encoder(client):
    r = client.post("/v1/galleries", json={"name": "staff", "encoder": "face"})
    assert r.status_code == 201 and r.json() == {"name": "staff", "encoder": "face", "examples": 0}
    assert client.post("/v1/galleries", json={"name": "staff", "encoder": "face"}).status_code == 200
    other = client.post("/v1/galleries", json={"name": "staff", "encoder": "fake"})
    assert other.status_code == 409 and "exists with encoder 'face'" in other.json()["error"]["message"]
    nope = client.post("/v1/galleries", json={"name": "x", "encoder": "timm:resnet50"})
    assert nope.status_code == 400 and "not offered" in nope.json()["error"]["message"]
    assert client.post("/v1/galleries/shop/classes/red/examples", **upload(png(COLOURS["red"]))).status_code == 201
    listed = {g["name"]: g["encoder"] for g in client.get("/v1/galleries").json()}
    assert listed["staff"] == "face" and listed["shop"] == "fake"  # enrolling made it with the default
    ready = client.get("/readyz").json()
    assert ready["encoder"] == "fake" and ready["encoders"]["face"]["dim"] == 128


@needs_faces
def test_three_people_enrolled_one_photo_each_and_a_stranger_is_unknown(client):
    client.post("/v1/galleries", json={"name": "trio", "encoder": "face"})
    for person in (21, 22, 23):
        r = client.post(f"/v1/galleries/trio/classes/p{person}/examples", **upload(orl(person, 1)))
        assert r.status_code == 201 and r.json()["faces"] == [1], r.text
    for person in (21, 22, 23):
        result = client.post("/v1/galleries/trio/recognize", **upload(orl(person, 2))).json()
        assert result["threshold_source"] == "reference" and result["faces"] == [1]
        top = result["results"][0]
        assert top["matches"][0]["label"] == f"p{person}" and not top["unknown"], top
        assert top["image"] == 0 and len(top["box"]) == 4
    stranger = client.post("/v1/galleries/trio/recognize", **upload(orl(24, 1))).json()["results"][0]
    assert stranger["unknown"] is True, stranger
    verified = client.post("/v1/galleries/trio/verify?label=p22", **upload(orl(22, 3))).json()
    assert verified["match"] is True and verified["threshold_source"] == "reference"


@needs_faces
def test_every_face_of_a_group_photo_is_answered_with_its_box(client):
    client.post("/v1/galleries", json={"name": "team", "encoder": "face"})
    big_first = group((25, 1.0), (26, 1.5))  # person 26 is the larger face
    asked = client.post("/v1/galleries/team/classes/p26/examples", **upload(big_first))
    assert asked.status_code == 422 and asked.json()["error"]["type"] == "several_faces"
    assert len(asked.json()["error"]["faces"]) == 2  # every box, with its score, to choose from
    enrolled = client.post("/v1/galleries/team/classes/p26/examples?face=largest", **upload(big_first)).json()
    assert enrolled["faces"] == [2] and enrolled["boxes"][0][0] > 92  # the larger face, the right one, enrolled
    client.post("/v1/galleries/team/classes/p25/examples", **upload(orl(25, 1)))
    r = client.post("/v1/galleries/team/recognize",
                    files=[("files", ("a.jpg", group((26, 1.2), (25, 1.2)), "image/jpeg")),
                           ("files", ("b.pgm", orl(25, 3), "image/x-portable-graymap"))]).json()
    assert r["faces"] == [2, 1] and len(r["results"]) == 3
    by_image = [(x["image"], x["matches"][0]["label"], x["box"]) for x in r["results"]]
    left, right = sorted([b for b in by_image if b[0] == 0], key=lambda b: b[2][0])
    assert left[1] == "p26" and right[1] == "p25" and left[2][2] <= right[2][0]  # boxes in image pixels
    assert by_image[-1][:2] == (1, "p25")


NO_FACE = jpeg_bytes(photo("coffee"), (640, 480))


@pytest.mark.parametrize("name, method, path, kwargs, status, words", [
    ("no face on enroll", "post", "/v1/galleries/faces/classes/x/examples", upload(NO_FACE), 422, "no face found"),
    ("1 px wide", "post", "/v1/galleries/faces/classes/x/examples",
     upload(jpeg_bytes(Image.new("RGB", (1, 300), (90, 90, 90)))), 422, "no face found"),
    ("no face on verify", "post", "/v1/galleries/faces/verify?label=x", upload(NO_FACE), 422, "no face found"),
    ("no face on embed", "post", "/v1/embed?encoder=face", upload(NO_FACE), 422, "no face found"),
    ("encoder not offered", "post", "/v1/embed?encoder=pixels:32", upload(NO_FACE), 400, "not offered"),
    ("object vector to a face gallery", "post", "/v1/galleries/faces/recognize/embedding",
     {"json": {"vectors": [[0, 0, 1]]}}, 400, "shape"),
    ("face vector to an object gallery", "post", "/v1/galleries/shop/recognize/embedding",
     {"json": {"vectors": [[0.1] * 128]}}, 400, "shape"),
    ("another fingerprint", "post", "/v1/galleries/faces/recognize/embedding",
     {"json": {"vectors": [[0.1] * 128], "fingerprint": "fake-fp"}}, 409, "re-embed"),
])
def test_bad_face_input_gets_a_clear_error_and_changes_nothing(client, name, method, path, kwargs, status, words):
    client.post("/v1/galleries", json={"name": "faces", "encoder": "face"})
    client.post("/v1/galleries/shop/classes/red/examples", **upload(png(COLOURS["red"])))
    if FACES.is_file():
        client.post("/v1/galleries/faces/classes/x/examples", **upload(orl(30, 1)))
    before = [client.get(f"/v1/galleries/{g}/classes").json() for g in ("faces", "shop")]
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["error"]["message"].lower()
    if status == 422:
        assert r.json()["error"]["type"] == "no_face"
    assert [client.get(f"/v1/galleries/{g}/classes").json() for g in ("faces", "shop")] == before


def test_a_photo_without_a_face_recognises_nothing(client):
    client.post("/v1/galleries", json={"name": "empty-faces", "encoder": "face"})
    if FACES.is_file():
        client.post("/v1/galleries/empty-faces/classes/x/examples", **upload(orl(31, 1)))
        r = client.post("/v1/galleries/empty-faces/recognize", **upload(NO_FACE))
        assert r.status_code == 200 and r.json()["results"] == [] and r.json()["faces"] == [0]


@needs_faces
def test_embed_with_the_face_encoder(client):
    r = client.post("/v1/embed?encoder=face", **upload(orl(33, 1))).json()
    assert r["dim"] == 128 and r["faces"] == [1] and abs(np.linalg.norm(r["embeddings"][0]) - 1) < 1e-5


@needs_faces
def test_a_face_under_the_detectors_minimum_is_no_face(client):
    client.post("/v1/galleries", json={"name": "tiny", "encoder": "face"})
    canvas = Image.new("RGB", (640, 480), (120, 120, 120))
    canvas.paste(Image.open(io.BytesIO(orl(34, 1))).convert("RGB").resize((23, 28)), (300, 200))
    r = client.post("/v1/galleries/tiny/classes/x/examples", **upload(jpeg_bytes(canvas)))
    assert r.status_code == 422 and r.json()["error"]["type"] == "no_face"
    assert client.get("/v1/galleries/tiny/classes").json()["total"] == 0


@needs_faces
def test_a_face_set_embedded_offline_and_imported_is_served_by_a_default_server(tmp_path, cache_dir):
    """`fewshot embed --encoder face` records face:detect; `gallery import` makes the gallery with it; a
    server with the default settings (offering `face`) serves that gallery: one encoder, one name."""
    from fewshot.cli import main

    for person in (1, 2):
        (tmp_path / "faces" / f"p{person}").mkdir(parents=True)
        (tmp_path / "faces" / f"p{person}" / "1.pgm").write_bytes(orl(person, 1))
    assert main(["embed", "--encoder", "face", "--cache-dir", str(cache_dir), "--quiet", str(tmp_path / "faces"),
                 str(tmp_path / "out")]) == 0
    assert main(["gallery", "import", str(tmp_path / "out"), "--gallery", "people", "--data-dir",
                 str(tmp_path / "data"), "--quiet"]) == 0
    with TestClient(create_app(Settings(data_dir=tmp_path / "data", cache_dir=cache_dir))) as c:
        assert c.get("/v1/galleries/people").json()["encoder"] == "face:detect"
        answer = c.post("/v1/galleries/people/recognize", **upload(orl(2, 5), "p.pgm"))
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0]["matches"][0]["label"] == "p2"
        same = c.post("/v1/galleries", json={"name": "people", "encoder": "face"})
        assert same.status_code == 200  # the same encoder by its other name
