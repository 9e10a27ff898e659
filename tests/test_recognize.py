"""Recognition over a gallery: the service ranks exactly as ``fewshot.heads`` does, and calibration
never makes a query wait once a first threshold exists."""
from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fewshot.gallery_store import GalleryStore
from fewshot.heads import HEADS, scores
from fewshot.recognize import Recognizer
from fewshot_service.config import Settings
from fewshot_service.main import create_app

from .test_heads import clusters


class VectorEncoder:
    """The service needs an encoder; these tests only send vectors (dim 24)."""

    name, fingerprint, dim, input_shape = "vectors", "vectors-fp", 24, (3, 8, 8)
    max_bytes, max_pixels = 1_000_000, 4_000_000

    finds_faces = False

    def preprocess(self, data: bytes) -> np.ndarray:
        raise AssertionError("not used")

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return np.eye(self.dim, dtype=np.float32)[np.zeros(len(batch), int)]


@pytest.mark.parametrize("head", HEADS)
def test_the_service_ranks_as_the_heads_do(tmp_path, head):
    """A gallery of 150 examples (more than the cache head's 64 neighbours): every query's top 5,
    through HTTP, has the labels and scores of heads.scores over all the examples."""
    x, labels = clusters(n_classes=10, per_class=15, dim=24, spread=0.8, seed=11)
    gallery = GalleryStore(tmp_path).get("g", 24, "vectors-fp", create=True)
    for label in sorted(set(labels)):
        gallery.add(label, x[np.asarray(labels) == label])
    gallery.close()
    queries, _ = clusters(n_classes=10, per_class=2, dim=24, spread=0.8, seed=12)
    expected, names = scores(head, queries, x, labels)
    with TestClient(create_app(Settings(data_dir=tmp_path), encoder=VectorEncoder())) as c:
        r = c.post("/v1/galleries/g/recognize/embedding", json={"vectors": queries.tolist(), "k": 5, "head": head})
    assert r.status_code == 200, r.text
    for row, result in zip(expected, r.json()["results"]):
        top = np.argsort(-row, kind="stable")[:5]
        assert [m["label"] for m in result["matches"]] == [names[j] for j in top]
        np.testing.assert_allclose([m["score"] for m in result["matches"]], row[top], atol=1e-5)


class ManualExecutor:
    """Runs submitted work only when told to: shows what a query did not wait for."""

    def __init__(self) -> None:
        self.waiting = []

    def submit(self, fn):
        self.waiting.append(fn)

    def run_all(self) -> None:
        while self.waiting:
            self.waiting.pop(0)()


def test_a_changed_gallery_answers_with_the_last_threshold_while_a_new_one_is_computed(tmp_path):
    x, labels = clusters(n_classes=8, per_class=4, dim=16, seed=6)
    gallery = GalleryStore(tmp_path).get("g", 16, "fp", create=True)
    for label in sorted(set(labels))[:6]:
        gallery.add(label, x[np.asarray(labels) == label])
    background = ManualExecutor()
    recognizer = Recognizer(gallery, background)
    first = recognizer.predict(x[:2])
    assert first.threshold_version == first.version == gallery.version  # the first one is computed at once
    threshold = first.results[0]["threshold"]
    for label in sorted(set(labels))[6:]:
        gallery.add(label, x[np.asarray(labels) == label])
    stale = recognizer.predict(x[:2])
    assert stale.version == gallery.version and stale.threshold_version == first.version  # did not wait
    assert stale.results[0]["threshold"] == threshold and len(background.waiting) == 1
    recognizer.predict(x[:2])
    assert len(background.waiting) == 1  # one recomputation at a time
    background.run_all()
    fresh = recognizer.predict(x[:2])
    assert fresh.threshold_version == fresh.version == gallery.version
    assert recognizer.calibration()[1].impostors == len(x)


def test_without_an_executor_thresholds_are_always_current(tmp_path):
    x, labels = clusters(n_classes=6, per_class=3, dim=16, seed=7)
    gallery = GalleryStore(tmp_path).get("g", 16, "fp", create=True)
    recognizer = Recognizer(gallery)
    gallery.add("a", x[:3])
    assert recognizer.predict(x[:1]).threshold_version is None  # one class: nothing to calibrate yet
    for i in range(3, len(x), 3):
        gallery.add(labels[i], x[i:i + 3])
        answer = recognizer.predict(x[:1])
        assert answer.threshold_version == answer.version == gallery.version
    given = recognizer.predict(x[:1], threshold=0.5)
    assert given.threshold_version is None and given.results[0]["threshold"] == 0.5


def test_a_gallery_of_many_classes_decides_on_the_margin_unless_asked_otherwise(tmp_path):
    """120 one-shot classes (>= 100 impostor values): the gallery's own threshold is on the margin, each
    result says so with the value it compared; decision=score asks for the best score; a small gallery
    and a given threshold decide on the score."""
    from fewshot.heads import decision_values

    x, labels = clusters(n_classes=120, per_class=1, dim=24, spread=0.8, seed=5)
    store = GalleryStore(tmp_path)
    big, small = store.get("big", 24, "vectors-fp", create=True), store.get("small", 24, "vectors-fp", create=True)
    for i, label in enumerate(labels):
        big.add(label, x[i:i + 1])
        if i < 3:
            small.add(label, x[i:i + 1])
    big.close(), small.close()
    queries, _ = clusters(n_classes=120, per_class=1, dim=24, spread=0.8, seed=6)
    with TestClient(create_app(Settings(data_dir=tmp_path), encoder=VectorEncoder())) as c:
        def ask(gallery, **extra):
            r = c.post(f"/v1/galleries/{gallery}/recognize/embedding",
                       json={"vectors": queries[:5].tolist(), "k": 3, **extra})
            assert r.status_code == 200, r.text
            return r.json()

        answer = ask("big")
        assert answer["threshold_source"] == "gallery"
        expected = decision_values(queries[:5] @ x.T, "margin")  # one-shot prototypes are the examples
        for result, value in zip(answer["results"], expected):
            assert result["decision"] == "margin" and result["decision_value"] == pytest.approx(value, abs=1e-5)
            assert result["unknown"] == (value < result["threshold"])
        assert c.get("/v1/galleries/big").json()["decision"] == "margin"
        assert {r["decision"] for r in ask("big", decision="score")["results"]} == {"score"}
        assert {r["decision"] for r in ask("small")["results"]} == {"score"}
        assert {r["decision"] for r in ask("big", threshold=0.5)["results"]} == {"score"}
        assert c.post("/v1/galleries/big/recognize/embedding",
                      json={"vectors": queries[:1].tolist(), "decision": "ratio"}).status_code == 422
