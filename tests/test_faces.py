"""The face encoder: dlib's network read from its .dat and run in our runtimes matches dlib itself;
detection, alignment and the largest face; bad images."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from fewshot import create_encoder
from fewshot.dlib_format import DlibFormatError, read_dlib_net
from fewshot.errors import InvalidImage, NoFace

from .conftest import SHARED_DATA, jpeg_bytes, photo

dlib = pytest.importorskip("dlib", reason="the face extra is not installed: pip install -e '.[face]'")
FACES = SHARED_DATA / "faces" / "att_faces.zip"
needs_faces = pytest.mark.skipif(not FACES.is_file(), reason=f"real faces data absent: {FACES}")


def orl(person: int, shot: int) -> bytes:
    with zipfile.ZipFile(FACES) as z:
        return z.read(f"att_faces/s{person}/{shot}.pgm")


@pytest.fixture(scope="module")
def face_encoder(cache_dir):
    return create_encoder("face", device="cpu", runtime="onnx", cache_dir=cache_dir)


@needs_faces
@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_the_port_matches_dlib_on_every_chip(runtime, cache_dir):
    """Chips of 40 people (ORL) and a photo: our network's descriptors against dlib's own
    compute_face_descriptor on the same chips, cosine >= 0.9999 each."""
    from fewshot.faces import NETWORK_FILE, model_file

    encoder = create_encoder("face", device="cpu", runtime=runtime, cache_dir=cache_dir)
    reference = dlib.face_recognition_model_v1(str(model_file(NETWORK_FILE)))
    images = [orl(person, 1) for person in range(1, 41)] + [jpeg_bytes(photo("astronaut"))]
    chips = np.stack([encoder.preprocess(data) for data in images])
    theirs = np.stack([np.asarray(reference.compute_face_descriptor(np.ascontiguousarray(c.transpose(1, 2, 0))))
                       for c in chips]).astype(np.float32)
    ours = encoder.embed(chips)
    cosine = (ours * theirs).sum(axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= 0.9999, cosine.min()


@needs_faces
def test_faces_are_found_boxed_and_compared(face_encoder):
    found = face_encoder.instances(orl(1, 1))
    assert len(found) == 1 and found[0].pixels.shape == (3, 150, 150)
    x0, y0, x1, y1 = found[0].box
    assert 0 <= x0 < x1 <= 92 and 0 <= y0 < y1 <= 112  # in the original image's pixels
    rows = face_encoder.embed(np.stack([face_encoder.preprocess(orl(p, s)) for p in (1, 2) for s in (1, 2)]))
    sims = rows @ rows.T
    assert sims[0, 1] > sims[0, 2] and sims[2, 3] > sims[1, 3]  # the same person is nearer


@needs_faces
def test_largest_face_first_in_a_group_photo(face_encoder):
    small = Image.open(io.BytesIO(orl(3, 1))).convert("RGB")
    large = Image.open(io.BytesIO(orl(7, 1))).convert("RGB").resize((138, 168))
    group = Image.new("RGB", (360, 200), (128, 128, 128))
    group.paste(small, (10, 40))
    group.paste(large, (200, 10))
    found = face_encoder.instances(jpeg_bytes(group))
    assert len(found) == 2 and found[0].box[0] >= 200 and found[1].box[0] < 120
    alone = face_encoder.embed(face_encoder.preprocess(jpeg_bytes(large))[None])
    assert float((face_encoder.embed(found[0].pixels[None]) @ alone.T)[0, 0]) > 0.98


@needs_faces
@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "RGBA"])
def test_every_image_mode_with_a_face_works(face_encoder, mode):
    image = Image.open(io.BytesIO(orl(5, 1))).convert("RGB")
    if mode == "I;16":
        converted = Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257)
        buffer = io.BytesIO()
        converted.save(buffer, "PNG")
    else:
        buffer = io.BytesIO()
        image.convert(mode).save(buffer, "TIFF" if mode == "CMYK" else "PNG")
    assert len(face_encoder.instances(buffer.getvalue())) == 1


@pytest.mark.parametrize("size", [(1, 300), (300, 1), (640, 480)])
def test_no_face_is_a_clear_error(face_encoder, size):
    blank = jpeg_bytes(Image.new("RGB", size, (200, 180, 160))) if size != (640, 480) else \
        jpeg_bytes(photo("coffee"), (640, 480))
    assert face_encoder.instances(blank) == []
    with pytest.raises(NoFace, match="no face found"):
        face_encoder.preprocess(blank)
    with pytest.raises(InvalidImage):
        face_encoder.preprocess(b"not an image")


@needs_faces
def test_crop_mode_embeds_a_face_crop_like_detection(cache_dir, face_encoder):
    crop = create_encoder("face:crop", device="cpu", runtime="onnx", cache_dir=cache_dir)
    assert crop.fingerprint == face_encoder.fingerprint  # one vector space
    x0, y0, x1, y1 = face_encoder.instances(orl(9, 1))[0].box
    tight = Image.open(io.BytesIO(orl(9, 1))).convert("RGB").crop((x0, y0, x1, y1))
    detected = face_encoder.embed(face_encoder.preprocess(orl(9, 1))[None])
    cropped = crop.embed(crop.preprocess(jpeg_bytes(tight, quality=95))[None])
    assert float((detected @ cropped.T)[0, 0]) > 0.97


def test_a_truncated_network_file_is_refused(tmp_path):
    from fewshot.faces import NETWORK_FILE, model_file

    data = model_file(NETWORK_FILE).read_bytes()
    (tmp_path / "cut.dat").write_bytes(data[:len(data) // 2])
    with pytest.raises(DlibFormatError, match="truncated"):
        read_dlib_net(tmp_path / "cut.dat")
    (tmp_path / "other.dat").write_bytes(b"\x01\x01\x01\x0closs_mmod_xx" + data[40:400])
    with pytest.raises(DlibFormatError):
        read_dlib_net(tmp_path / "other.dat")


@needs_faces
def test_embedding_a_folder_with_the_face_encoder(tmp_path, face_encoder):
    """The largest face of each photo; a photo without one is a line of errors.jsonl, not a failure."""
    import json

    from fewshot import embed_dataset

    (tmp_path / "src" / "x").mkdir(parents=True)
    (tmp_path / "src" / "x" / "face.pgm").write_bytes(orl(1, 1))
    (tmp_path / "src" / "x" / "cup.jpg").write_bytes(jpeg_bytes(photo("coffee"), (320, 240)))
    report = embed_dataset(tmp_path / "src", tmp_path / "out", face_encoder, workers=0, progress=False)
    assert (report.count, report.errors) == (1, 1)
    (error,) = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert error["path"].endswith("cup.jpg") and error["error"].startswith("no face found")
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert row["path"].endswith("face.pgm") and row["faces"] == 1


def test_a_big_photo_is_searched_on_a_reduced_copy_and_aligned_from_every_pixel():
    """A 12 MP portrait: the face is found on a copy of at most DETECT_LONG_SIDE px, its box scaled back
    lands within a few percent of the full-resolution detection's, and the embedding matches."""
    import io

    from fewshot import create_encoder
    from fewshot.faces import DETECT_LONG_SIDE, FaceLocator
    from fewshot.images import decode_image

    from .conftest import photo

    big = photo("astronaut").resize((3000, 3000))
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=90)
    image = decode_image(buffer.getvalue())
    assert max(image.size) > DETECT_LONG_SIDE
    reduced = FaceLocator()(image)
    everywhere = FaceLocator(upsample=0)(image)  # a given upsampling searches every pixel
    assert len(reduced) == len(everywhere) == 1
    (a, b) = (np.asarray(reduced[0].box), np.asarray(everywhere[0].box))
    assert np.abs(a - b).max() <= 0.05 * (b[2] - b[0]), (a, b)
    face = create_encoder("face", device="cpu", runtime="onnx")
    x = face.embed(np.stack([reduced[0].pixels, everywhere[0].pixels]))
    assert float(x[0] @ x[1]) >= 0.99


def test_a_big_jpeg_is_decoded_at_reduced_scale_for_faces_and_answers_in_the_uploads_pixels(cache_dir):
    """A 12 MP JPEG (4032x3024) is decoded at half scale for the face encoder (4x fewer pixels): the same
    faces as decoding every pixel, boxes in the upload's pixels, embeddings equal within 0.995."""
    import io

    from fewshot import create_encoder
    from fewshot.faces import DECODE_SHORT_SIDE, FaceLocator
    from fewshot.images import decode_image, upload_scale

    from .conftest import photo

    buffer = io.BytesIO()
    photo("astronaut").resize((4032, 3024)).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    half = decode_image(data, at_least=DECODE_SHORT_SIDE)
    assert half.size == (2016, 1512) and upload_scale(half) == 2.0
    face = create_encoder("face", device="cpu", runtime="onnx", cache_dir=cache_dir)
    reduced = face.instances(data)
    full = FaceLocator()(decode_image(data))  # every pixel decoded
    assert len(reduced) == len(full) >= 1
    for ours, theirs in zip(reduced, full):
        a, b = np.asarray(ours.box), np.asarray(theirs.box)
        assert np.abs(a - b).max() <= 0.03 * (b[2] - b[0]), (a, b)
        x = face.embed(np.stack([ours.pixels, theirs.pixels]))
        assert float(x[0] @ x[1]) >= 0.995
