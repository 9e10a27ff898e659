"""dlib's CNN face detector (MMOD) read from its .dat and run in ONNX Runtime finds the faces dlib's own
cnn_face_detection_model_v1 finds, boxes and scores, on real photos; face:cnn through the encoder."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from fewshot import create_encoder
from fewshot.dlib_format import DlibFormatError

from .conftest import SHARED_DATA, jpeg_bytes, photo

dlib = pytest.importorskip("dlib", reason="the face extra is not installed: pip install -e '.[face]'")
LFW = SHARED_DATA / "faces" / "lfw_dev_a-j.zip"


@pytest.fixture(scope="module")
def detectors():
    from fewshot.face_cnn import MMOD_FILE, CNNFaceDetector
    from fewshot.faces import model_file

    path = str(model_file(MMOD_FILE))
    return CNNFaceDetector(path, threads=2), dlib.cnn_face_detection_model_v1(path)


def real_photos() -> list[np.ndarray]:
    """The astronaut (512 px, one face), at 640x480, and every 400th LFW dev photo when the data is here
    (250 px, often several faces)."""
    astronaut = photo("astronaut")
    photos = [np.asarray(astronaut), np.asarray(astronaut.resize((640, 480)))]
    if LFW.is_file():
        with zipfile.ZipFile(LFW) as z:
            names = [n for n in z.namelist() if n.endswith(".jpg")][::400]
            photos += [np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")) for n in names]
    return photos


def test_the_port_finds_what_dlib_finds(detectors):
    """Every face dlib's CNN detector finds (score > 0, no upsampling) is found here at the same box within
    1 px and the same score within 1e-3, and nothing else is."""
    ours, theirs = detectors
    compared = 0
    for rgb in real_photos():
        expected = [((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), d.confidence)
                    for d in theirs(rgb, 0)]
        found = ours(rgb)
        assert len(found) == len(expected), (found, expected)
        for (box, score), (their_box, their_score) in zip(found, sorted(expected, key=lambda d: -d[1])):
            assert max(abs(a - b) for a, b in zip(box, their_box)) <= 1, (box, their_box)
            assert abs(score - their_score) < 1e-3
            compared += 1
    assert compared >= 2


def test_a_batch_of_sizes_finds_what_each_alone_finds(detectors):
    """Images of different sizes in one pass (zero-padded to one size): the same faces as one at a time."""
    ours, _ = detectors
    photos = real_photos()[:2] + [np.asarray(photo("astronaut").resize((300, 330)))]
    batched = ours.detect_many(photos + [np.zeros((1, 300, 3), np.uint8)])  # and one too small for the network
    assert batched[-1] == [] and ours(np.zeros((40, 2, 3), np.uint8)) == []
    for rgb, faces in zip(photos, batched):
        alone = ours(rgb)
        assert [box for box, _ in faces] == [box for box, _ in alone]
        np.testing.assert_allclose([s for _, s in faces], [s for _, s in alone], atol=1e-4)


def test_face_cnn_enrolls_her_face_not_the_patch(cache_dir):
    """The astronaut at JPEG quality 75: HOG takes the mission patch on her suit for a face (and it is
    larger); the CNN finds her face alone, in the same vectors' space as `face`."""
    cnn = create_encoder("face:cnn", device="cpu", runtime="onnx", cache_dir=cache_dir)
    hog = create_encoder("face", device="cpu", runtime="onnx", cache_dir=cache_dir)
    assert cnn.fingerprint == hog.fingerprint
    data = jpeg_bytes(photo("astronaut"), quality=75)
    faces = cnn.instances(data)
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].box
    assert 150 < (x0 + x1) / 2 < 280 and 60 < (y0 + y1) / 2 < 180  # her face, not the patch at y ~ 380
    her_face_by_hog = max(hog.instances(data), key=lambda f: f.score)
    assert float((cnn.embed(faces[0].pixels[None]) @ hog.embed(her_face_by_hog.pixels[None]).T)[0, 0]) > 0.95


def test_a_file_that_is_not_a_detector_is_refused_by_name(tmp_path):
    from fewshot.face_cnn import read_detector
    from fewshot.faces import NETWORK_FILE, model_file

    with pytest.raises(DlibFormatError, match="not a dlib MMOD detector"):
        read_detector(model_file(NETWORK_FILE))
    from fewshot.face_cnn import MMOD_FILE

    truncated = tmp_path / "short.dat"
    truncated.write_bytes(model_file(MMOD_FILE).read_bytes()[:5000])
    with pytest.raises(DlibFormatError, match="truncated"):
        read_detector(truncated)
