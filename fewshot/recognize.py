"""Recognition over a gallery: the heads, with caches that follow the gallery's version.

Without an adapter, prototypes are recomputed only after the gallery changes and ``knn`` and
``cache`` read the nearest examples from the gallery's index, so a query never copies the gallery.
With an adopted adapter (see ``fewshot.adapt``), queries and examples are mapped through it first;
the mapped examples, their prototypes and the calibrated thresholds are cached per version.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .adapt import Adapter, AdapterReport
from .calibration import calibrate
from .errors import EmptyGallery, UnknownLabel
from .gallery import Gallery, check_vectors
from .heads import CACHE_BETA, HEADS, prototypes, rank, scores

NEIGHBOURS = 64  # examples read from the index for knn and cache; exp(-beta (1 - cos)) is ~0 beyond


class Recognizer:
    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery
        self._lock = threading.Lock()
        self._space: tuple | None = None  # (key, vectors or None, labels, prototypes, names)
        self._thresholds: dict = {}
        self.adapter = Adapter.load(gallery.folder) if (gallery.folder / "adapter.npy").is_file() else None

    def set_adapter(self, adapter: Adapter | None, report: AdapterReport | None = None) -> None:
        """Adopt ``adapter`` (saved beside the gallery), or drop the current one with None."""
        with self._lock:
            if adapter is None:
                for name in ("adapter.npy", "adapter.json"):
                    Path(self.gallery.folder / name).unlink(missing_ok=True)
            else:
                adapter.save(self.gallery.folder, report or AdapterReport(True, "set by hand"))
            self.adapter, self._space, self._thresholds = adapter, None, {}

    def _current(self) -> tuple:
        """(vectors in the head's space or None, labels, prototypes, names), cached per version."""
        key = (self.gallery.version, id(self.adapter))
        with self._lock:
            if self._space is None or self._space[0] != key:
                vectors, _, labels = self.gallery.vectors()
                if len(vectors) == 0:
                    raise EmptyGallery(f"gallery {self.gallery.name!r} is empty; enroll at least one image first")
                mapped = self.adapter.apply(vectors) if self.adapter else None
                protos, names = prototypes(vectors if mapped is None else mapped, labels)
                self._space = (key, mapped, labels, protos, names)
            return self._space[1:]

    def scores(self, queries: np.ndarray, head: str = "prototype", knn_k: int = 5) -> tuple[np.ndarray, list[str]]:
        """(n, dim) -> class scores (n, C) over the gallery's classes, in name order."""
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")
        queries = check_vectors(queries, self.gallery.dim)
        mapped, labels, protos, names = self._current()
        if mapped is not None:
            return scores(head, self.adapter.apply(queries), mapped, labels, **({"k": knn_k} if head == "knn" else {}))
        proto_scores = queries @ protos.T
        if head == "prototype":
            return proto_scores, names
        return self._index_scores(queries, head, knn_k, proto_scores, names), names

    def _index_scores(self, queries, head: str, knn_k: int, proto_scores: np.ndarray, names: list[str]) -> np.ndarray:
        column = {name: j for j, name in enumerate(names)}
        sims, _, labels = self.gallery.search(queries, knn_k if head == "knn" else NEIGHBOURS)
        out = np.zeros_like(proto_scores) if head == "knn" else proto_scores.copy()
        for row, (row_sims, row_labels) in enumerate(zip(sims, labels)):
            for sim, label in zip(row_sims, row_labels):
                out[row, column[label]] += sim / len(row_labels) if head == "knn" else np.exp(-CACHE_BETA * (1.0 - sim))
        return out

    def threshold(self, head: str, threshold: float | None, far: float | None) -> float | None:
        """An explicit threshold, else the calibrated one for ``far`` (default 1%) in the head's space."""
        if threshold is not None:
            return float(threshold)
        far = far if far is not None else 0.01
        if self.adapter is None:
            return self.gallery.calibration(far, head).threshold
        mapped, labels, _, _ = self._current()
        key = (self.gallery.version, id(self.adapter), far, head)
        if key not in self._thresholds:
            self._thresholds = {key: calibrate(mapped, labels, far, head).threshold}
        return self._thresholds[key]

    def predict(self, queries: np.ndarray, k: int = 5, head: str = "prototype", threshold: float | None = None,
                far: float | None = None) -> list[dict]:
        """Per query: top-k classes with scores, ``unknown`` under the threshold, and the threshold."""
        class_scores, names = self.scores(queries, head)
        return rank(class_scores, names, k, self.threshold(head, threshold, far))

    def verify(self, query: np.ndarray, label: str, threshold: float | None = None,
               far: float | None = None) -> dict:
        """Is ``query`` of class ``label``? Its prototype score against the threshold."""
        class_scores, names = self.scores(query, "prototype")
        if label not in names:
            raise UnknownLabel(f"no class {label!r} in gallery {self.gallery.name!r}")
        score = float(class_scores[0, names.index(label)])
        limit = self.threshold("prototype", threshold, far)
        return {"label": label, "score": score, "threshold": limit, "match": limit is None or score >= limit}
