"""Recognition over a gallery: the heads, with caches that follow the gallery's version.

Prototypes are recomputed only after the gallery changes; ``knn`` and ``cache`` read the nearest
examples from the gallery's index, so a query never copies the whole gallery.
"""
from __future__ import annotations

import threading

import numpy as np

from .errors import EmptyGallery, UnknownLabel
from .gallery import Gallery, check_vectors
from .heads import HEADS, prototypes, rank

NEIGHBOURS = 64  # examples read from the index for knn and cache; exp(-5.5 (1 - cos)) is ~0 beyond


class Recognizer:
    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery
        self._lock = threading.Lock()
        self._cached: tuple[int, np.ndarray, list[str]] | None = None

    def prototypes(self) -> tuple[np.ndarray, list[str]]:
        """(class means re-normalised (C, dim), names), cached per gallery version."""
        version = self.gallery.version
        with self._lock:
            if self._cached is None or self._cached[0] != version:
                vectors, _, labels = self.gallery.vectors()
                if len(vectors) == 0:
                    raise EmptyGallery(f"gallery {self.gallery.name!r} is empty; enroll at least one image first")
                self._cached = (version, *prototypes(vectors, labels))
            return self._cached[1], self._cached[2]

    def scores(self, queries: np.ndarray, head: str = "prototype", knn_k: int = 5) -> tuple[np.ndarray, list[str]]:
        """(n, dim) -> class scores (n, C) over the gallery's classes, in name order."""
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")
        queries = check_vectors(queries, self.gallery.dim)
        protos, names = self.prototypes()
        proto_scores = queries @ protos.T
        if head == "prototype":
            return proto_scores, names
        column = {name: j for j, name in enumerate(names)}
        sims, _, labels = self.gallery.search(queries, knn_k if head == "knn" else NEIGHBOURS)
        out = np.zeros_like(proto_scores) if head == "knn" else proto_scores.copy()
        for row, (row_sims, row_labels) in enumerate(zip(sims, labels)):
            for sim, label in zip(row_sims, row_labels):
                if head == "knn":
                    out[row, column[label]] += sim / len(row_labels)
                else:
                    out[row, column[label]] += np.exp(-5.5 * (1.0 - sim))
        return out, names

    def threshold(self, head: str, threshold: float | None, far: float | None) -> float | None:
        """An explicit threshold, else the gallery's calibrated one for ``far`` (default 1%)."""
        if threshold is not None:
            return float(threshold)
        return self.gallery.calibration(far if far is not None else 0.01, head).threshold

    def predict(self, queries: np.ndarray, k: int = 5, head: str = "prototype", threshold: float | None = None,
                far: float | None = None) -> list[dict]:
        """Per query: top-k classes with scores, ``unknown`` under the threshold, and the threshold."""
        scores, names = self.scores(queries, head)
        return rank(scores, names, k, self.threshold(head, threshold, far))

    def verify(self, query: np.ndarray, label: str, threshold: float | None = None,
               far: float | None = None) -> dict:
        """Is ``query`` of class ``label``? Its prototype score against the threshold."""
        scores, names = self.scores(query, "prototype")
        if label not in names:
            raise UnknownLabel(f"no class {label!r} in gallery {self.gallery.name!r}")
        score = float(scores[0, names.index(label)])
        limit = self.threshold("prototype", threshold, far)
        return {"label": label, "score": score, "threshold": limit, "match": limit is None or score >= limit}
