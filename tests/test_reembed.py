"""Re-embedding a gallery with another encoder from its kept originals: ids, labels and images kept,
changes made during the job carried over, queries answered throughout, refused without originals."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fewshot.errors import InvalidArgument
from fewshot.gallery_store import GalleryStore
from fewshot.images import KeptImage
from fewshot.reembed import reembed
from fewshot_service.config import Settings
from fewshot_service.main import create_app

from .conftest import jpeg_bytes, photo
from .test_service import COLOURS, FakeEncoder, png, upload


def by_first_byte(images):
    """A toy encoder: 4-d one-hot of the image's first byte mod 4, None for b'x' (nothing to embed)."""
    return [None if data[:1] == b"x" else np.eye(4, dtype=np.float32)[data[0] % 4] for data in images]


def stocked(tmp_path, keep=True):
    store = GalleryStore(tmp_path)
    g = store.get("g", 3, "old", "old-encoder", create=True)
    for i, label in enumerate(["a", "a", "b", "c"]):
        original = bytes([i]) + b"...image" if keep else None
        g.add(label, np.eye(3, dtype=np.float32)[i % 3][None], images=[KeptImage(b"thumb%d" % i, original, "image/png")])
    return store, g


def test_reembed_keeps_ids_labels_images_and_carries_changes_made_meanwhile(location):
    store, g = stocked(location)
    other = GalleryStore(location)  # another process (a replica) holding the same gallery
    theirs = other.get("g")
    calls = []

    def embed(images):
        if not calls:  # the job is under way: the gallery keeps changing
            g.add("d", np.ones((1, 3)), images=[KeptImage(b"t", bytes([3]) + b"new", "image/png")])
            g.remove_example(2)
            g.rename_class("c", "cc")
            g.add("e", np.ones((1, 3)), images=[KeptImage(b"t", b"x-no-face", "image/png")])
        calls.append(len(images))
        return by_first_byte(images)

    before_version = g.version
    report = reembed(store, "g", "new-encoder", 4, "new", embed)
    assert (g.dim, g.fingerprint, g.encoder) == (4, "new", "new-encoder") and g.version > before_version
    assert g.rows.classes() == [("a", 1), ("b", 1), ("cc", 1), ("d", 1)]  # example 2 ("a") removed, "e" left out
    assert report.examples == 4 and [s["label"] for s in report.skipped] == ["e"]
    vectors, ids, labels = g.vectors()
    assert sorted(ids.tolist()) == [1, 3, 4, 5] and vectors.shape == (4, 4)
    assert g.rows.image(3)[0] == bytes([2]) + b"...image" and g.rows.image(3, "thumbnail")[0] == b"thumb2"
    _, found, _ = g.search(np.eye(4, dtype=np.float32)[[0]], 1)
    assert found[0][0] == 1  # the new vectors answer
    store.close()
    reopened = GalleryStore(location).get("g")
    assert (reopened.dim, reopened.fingerprint, len(reopened)) == (4, "new", 4)
    assert GalleryStore(location).names() == ["g"]  # the scratch gallery is gone, never listed
    if store.kind == "sqlite":
        assert not list(location.glob(".g.reembed*")) and not (location / "g" / "gallery.next.sqlite").exists()
    else:  # the other replica follows: it now holds the new gallery
        deadline = time.monotonic() + 2
        while theirs.dim != 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (theirs.dim, theirs.fingerprint, theirs.rows.classes()) == (4, "new", reopened.rows.classes())
        assert sorted(theirs.vectors()[1].tolist()) == [1, 3, 4, 5]
    other.close()


def test_reembed_is_refused_without_originals_and_changes_nothing(tmp_path):
    store, g = stocked(tmp_path, keep=False)
    with pytest.raises(InvalidArgument, match="did not keep the original image of 4 example"):
        reembed(store, "g", "new-encoder", 4, "new", by_first_byte)
    assert (g.dim, g.fingerprint, len(g)) == (3, "old", 4)


class OtherFake(FakeEncoder):
    """Another encoder: the vector is the colour channels in reverse order."""

    name, fingerprint = "other", "other-fp"

    def embed(self, batch):
        return super().embed(batch)[:, ::-1].copy()


def test_reembed_through_the_service_while_queries_keep_being_answered(tmp_path):
    settings = Settings(data_dir=tmp_path, encoders="fake,other")
    with TestClient(create_app(settings, encoders={"fake": FakeEncoder(), "other": OtherFake()})) as c:
        for name, colour in COLOURS.items():
            assert c.post(f"/v1/galleries/g/classes/{name}/examples", **upload(png(colour))).status_code == 201
        codes, stop = [], threading.Event()

        def ask():
            while not stop.is_set():
                r = c.post("/v1/galleries/g/recognize", **upload(png(COLOURS["red"])))
                codes.append((r.status_code, r.json()["results"][0]["matches"][0]["label"]))

        asker = threading.Thread(target=ask)
        asker.start()
        r = c.post("/v1/galleries/g/reembed", json={"encoder": "other"})
        assert r.status_code == 202 and r.json()["status"] == "running"
        while (job := c.get("/v1/galleries/g/reembed").json())["status"] == "running":
            pass
        stop.set()
        asker.join()
        assert job["status"] == "done" and job["report"]["examples"] == 3, job
        assert codes and all(code == (200, "red") for code in codes)  # no moment where queries failed
        assert c.get("/v1/galleries").json()[0]["encoder"] == "other"
        after = c.post("/v1/galleries/g/recognize", **upload(png(COLOURS["blue"]))).json()
        assert after["results"][0]["matches"][0]["label"] == "blue"
        vector = c.post("/v1/galleries/g/recognize/embedding", json={"vectors": [[1, 0, 0]], "fingerprint": "fake-fp"})
        assert vector.status_code == 409  # the old encoder's vectors are refused now
        assert c.post("/v1/galleries/g/reembed", json={"encoder": "nope"}).status_code == 400


def test_reembed_refused_by_the_service_when_originals_were_not_kept(tmp_path):
    settings = Settings(data_dir=tmp_path, encoders="fake,other", keep_images="thumbnail")
    with TestClient(create_app(settings, encoders={"fake": FakeEncoder(), "other": OtherFake()})) as c:
        c.post("/v1/galleries/g/classes/red/examples", **upload(png(COLOURS["red"])))
        c.post("/v1/galleries/g/reembed", json={"encoder": "other"})
        while (job := c.get("/v1/galleries/g/reembed").json())["status"] == "running":
            pass
        assert job["status"] == "failed" and "did not keep the original image" in job["error"]
        assert c.get("/v1/galleries").json()[0]["encoder"] == "fake"


def test_cli_gallery_reembed(tmp_path, cache_dir):
    from fewshot import create_encoder

    lite = create_encoder("efficientnet_lite0", device="cpu", runtime="onnx", cache_dir=cache_dir)
    g = GalleryStore(tmp_path).get("g", lite.dim, lite.fingerprint, "efficientnet_lite0", create=True)
    cat = jpeg_bytes(photo("chelsea"), (96, 64))
    g.add("cat", lite.embed(lite.preprocess(cat)[None]), images=[KeptImage(b"t", cat, "image/jpeg")])
    g.close()
    run = subprocess.run([sys.executable, "-m", "fewshot.cli", "gallery", "reembed", "g", "--data-dir", str(tmp_path),
                          "--encoder", "pixels:16", "--cache-dir", str(cache_dir), "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "1 example(s) re-embedded with pixels:16" in run.stdout, run.stderr
    assert GalleryStore(tmp_path).get("g").dim == 256
