"""Enrollment takes the right face or says why not: several faces -> the caller says which; a face too
small, blurred or weakly detected -> 422 face_quality with the measurements (quality=off forces it)."""
from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fewshot import create_encoder
from fewshot.errors import FaceQuality, InvalidArgument, NoFace, SeveralFaces
from fewshot.face_quality import choose, measure, parse_box
from fewshot.images import Instance
from fewshot_service.config import Settings
from fewshot_service.main import create_app

from .conftest import jpeg_bytes, photo
from .test_service import upload

pytest.importorskip("dlib", reason="the face extra is not installed: pip install -e '.[face]'")
RNG = np.random.default_rng(0)


def face(box, score=1.0, sharp=True) -> Instance:
    pixels = RNG.integers(0, 256, (3, 150, 150), dtype=np.uint8) if sharp else np.full((3, 150, 150), 128, np.uint8)
    return Instance(pixels, box, score)


def test_one_good_face_is_taken_and_several_need_a_choice():
    small_patch, her = face((123, 330, 228, 435), 0.07), face((179, 83, 267, 171), 1.63)
    assert choose([small_patch, her], (512, 512)) is her  # the patch is no face by its score
    a, b = face((0, 0, 100, 100), 0.9), face((300, 200, 420, 320), 1.4)
    with pytest.raises(SeveralFaces, match="face=largest") as raised:
        choose([a, b], (640, 480))
    assert [f["box"] for f in raised.value.details["faces"]] == [[0, 0, 100, 100], [300, 200, 420, 320]]
    assert choose([a, b], (640, 480), face="largest") is b and choose([a, b], (640, 480), face="best") is b
    assert choose([a, b], (200, 200), face="center") is a
    assert choose([a, b], (640, 480), box=(10, 5, 105, 95)) is a
    with pytest.raises(SeveralFaces, match="no face found in box"):
        choose([a, b], (640, 480), box=(500, 0, 600, 50))
    with pytest.raises(NoFace):
        choose([], (640, 480))
    with pytest.raises(InvalidArgument):
        choose([a], (640, 480), face="biggest")


def test_a_poor_face_is_refused_with_its_measurements_unless_forced():
    tiny = face((10, 10, 44, 44), 1.2)
    with pytest.raises(FaceQuality, match="face 34 px wide; at least 60 px") as raised:
        choose([tiny], (640, 480))
    assert raised.value.details["faces"][0]["width"] == 34
    assert choose([tiny], (640, 480), check=False) is tiny
    with pytest.raises(FaceQuality, match="blurred"):
        choose([face((0, 0, 100, 100), 1.2, sharp=False)], (640, 480))
    assert measure(face((0, 0, 100, 100))).sharpness > 1000


def test_boxes_are_parsed_or_refused():
    assert parse_box("1,2,30,40") == (1, 2, 30, 40) and parse_box(None) is None
    for bad in ("1,2,3", "a,b,c,d", "10,10,5,20"):
        with pytest.raises(InvalidArgument):
            parse_box(bad)


@pytest.fixture(scope="module")
def client(tmp_path_factory, cache_dir):
    faces = create_encoder("face", device="cpu", runtime="onnx", cache_dir=cache_dir)
    with TestClient(create_app(Settings(data_dir=tmp_path_factory.mktemp("data"), encoders="face"),
                               encoders={"face": faces})) as c:
        yield c


def test_the_astronaut_enrolls_her_face_not_her_patch_and_is_recognised_on_another_crop(client):
    astronaut = photo("astronaut")
    enrolled = client.post("/v1/galleries/crew/classes/eileen/examples", **upload(jpeg_bytes(astronaut, quality=75)))
    assert enrolled.status_code == 201, enrolled.text
    (x0, y0, x1, y1), = enrolled.json()["boxes"]
    assert 150 < x0 < 200 and 60 < y0 < 110 and enrolled.json()["detection_scores"][0] > 1  # her face
    other = astronaut.crop((60, 20, 420, 380)).resize((300, 300))  # another framing of the photo
    answer = client.post("/v1/galleries/crew/recognize", **upload(jpeg_bytes(other, quality=85))).json()
    best = max(answer["results"], key=lambda r: r["detection_score"])
    assert best["matches"][0]["label"] == "eileen" and not best["unknown"]
    assert all(r["detection_score"] is not None and len(r["landmarks"]) == 5 for r in answer["results"])


def test_a_tiny_face_answers_face_quality_and_quality_off_enrolls_it(client):
    canvas = Image.new("RGB", (300, 220), (120, 120, 120))  # small: searched again at twice the size
    canvas.paste(photo("astronaut").crop((150, 50, 300, 200)).resize((56, 56), Image.BICUBIC), (120, 80))
    data = jpeg_bytes(canvas, quality=95)
    refused = client.post("/v1/galleries/small/classes/x/examples", **upload(data))
    assert refused.status_code == 422 and refused.json()["error"]["type"] == "face_quality", refused.text
    assert "px wide; at least 60 px" in refused.json()["error"]["message"]
    assert client.get("/v1/galleries/small/classes").status_code in (200, 404)
    forced = client.post("/v1/galleries/small/classes/x/examples?quality=off", **upload(data))
    assert forced.status_code == 201


def test_bad_choices_are_400_before_any_work(client):
    r = client.post("/v1/galleries/crew/classes/y/examples?box=1,2,3", **upload(jpeg_bytes(photo("astronaut"))))
    assert r.status_code == 400 and "x0,y0,x1,y1" in r.json()["error"]["message"]
    r = client.post("/v1/galleries/crew/classes/y/examples?face=biggest", **upload(jpeg_bytes(photo("astronaut"))))
    assert r.status_code == 422  # FastAPI's validation of the choices


def test_detect_lists_every_face_with_its_score_and_quality(client):
    r = client.post("/v1/detect", **upload(jpeg_bytes(photo("astronaut"), quality=75)))
    assert r.status_code == 200, r.text
    (faces,) = r.json()["faces"]
    assert len(faces) == 2 and r.json()["encoder"] == "face"
    patch, her = sorted(faces, key=lambda f: f["score"])
    assert her["score"] > 1 and not her["problems"] and patch["problems"]  # the patch: a weak detection
    x0, y0, x1, y1 = her["box"]
    assert len(her["landmarks"]) == 5 and all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in her["landmarks"])
    none = client.post("/v1/detect", **upload(jpeg_bytes(photo("coffee"))))
    assert none.json()["faces"] == [[]]


def test_two_photos_are_verified_against_the_encoders_reference_threshold(client):
    astronaut = photo("astronaut")
    same = [jpeg_bytes(astronaut, quality=90), jpeg_bytes(astronaut.crop((60, 20, 420, 380)), quality=80)]
    files = {"files": [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(same)]}
    r = client.post("/v1/verify", **files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["match"] is True and body["threshold_source"] == "reference" and body["far"] == 0.01
    assert body["score"] > body["threshold"]
    strict = client.post("/v1/verify?threshold=0.9999", **files).json()
    assert strict["match"] is False and strict["threshold_source"] == "given"
    one = client.post("/v1/verify", **upload(same[0]))
    assert one.status_code == 400 and "exactly two images" in one.json()["error"]["message"]


def test_the_detector_score_asked_for_is_a_setting_and_a_request_parameter(client):
    """min_score=0.05 lets the astronaut's mission patch (HOG score 0.07) pass, so the photo holds two faces
    that could be enrolled; min_score=3 keeps her face (1.6) out; a non-number is a 422 before any work."""
    data = jpeg_bytes(photo("astronaut"), quality=75)
    lenient = client.post("/v1/galleries/crew2/classes/eileen/examples?min_score=0.05", **upload(data))
    assert lenient.status_code == 422 and lenient.json()["error"]["type"] == "several_faces", lenient.text
    strict = client.post("/v1/galleries/crew2/classes/eileen/examples?min_score=3", **upload(data))
    assert strict.status_code == 422 and strict.json()["error"]["type"] == "face_quality"
    assert "at least 3" in strict.json()["error"]["message"]
    detected = client.post("/v1/detect?min_score=3", **upload(data)).json()["faces"][0]
    assert all(any("detector score" in p for p in f["problems"]) for f in detected)
    assert client.post("/v1/detect?min_score=x", **upload(data)).status_code == 422
    assert client.get("/v1/galleries/crew2").status_code == 404  # nothing was made
