"""Recognition over a gallery: the heads of ``fewshot.heads`` on a gallery's index, and open-set
thresholds that never hold a query up.

Without an adapter a query reads its prototype cosines and nearest examples from the gallery in one
consistent lookup (``Gallery.lookup``) and the head combines them (``heads.combine``): nothing is
copied per query. With an adopted adapter (see ``fewshot.adapt``) queries and examples are mapped
through it first; the mapped examples are cached per gallery version and the same heads run by
brute force (``heads.scores``).

Thresholds: a calibrated threshold belongs to the gallery version it was computed from, which every
answer reports. Given an executor, a gallery that changed keeps answering with its last threshold
while the new one is computed in the background, on a snapshot, outside the gallery's lock: reads
and writes never wait for calibration. Only the very first calibration of a head and false-accept
rate is computed by the query that asks for it. Background runs are spaced so that they take at
most ~1/20 of the time (``DUTY``) under a steady stream of enrollments. Without an executor (library
use, tests) every threshold is recomputed in the caller and is always current.

A gallery too small to calibrate itself (fewer than ``reference.OWN_FROM`` impostor scores) uses its
encoder's reference operating point for the prototype head when it has one (``fewshot.reference``):
three one-shot classes give three impostor scores, no basis for a 1% false-accept threshold.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from .adapt import Adapter, AdapterReport
from .calibration import Calibration, calibrate, check_far, check_threshold
from .errors import EmptyGallery, GalleryClosed, UnknownLabel
from .gallery import Gallery, check_k, check_vectors
from .heads import check_head, combine, neighbours_needed, rank, scores
from .reference import OWN_FROM, ReferencePoint

DEFAULT_FAR = 0.01
ADAPTER, ADAPTER_REPORT = "adapter.npy", "adapter.json"  # the gallery's blobs
DUTY = 0.05  # background calibration may run at most this share of the time, per head and rate
log = logging.getLogger("fewshot")


@dataclass
class Answer:
    results: list[dict]  # per query: matches, unknown, threshold (see heads.rank)
    version: int  # the gallery version the scores come from
    threshold_version: int | None  # the version the threshold was calibrated on; None: given or none
    threshold_source: str | None = None  # "given", "gallery" (its own calibration), "reference" or None


class Recognizer:
    def __init__(self, gallery: Gallery, background: Executor | None = None, default_far: float = DEFAULT_FAR,
                 reference: ReferencePoint | None = None) -> None:
        self.gallery, self.background, self.default_far = gallery, background, check_far(default_far)
        self.reference = reference
        self._lock = threading.Lock()
        self._first = threading.Lock()  # a key's first calibration is computed once, not by every query
        self._generation = 0  # bumped when the adapter changes: part of every cache key
        self._mapped: tuple | None = None  # (version, generation, mapped vectors, labels)
        self._calibrations: dict[tuple, tuple[tuple[int, int], Calibration]] = {}
        self._pending: set[tuple] = set()
        self._not_before: dict[tuple, float] = {}
        self._adapter: Adapter | None = None
        self._adapter_from: int | None = None  # the gallery's blobs_version it was read at

    @property
    def adapter(self) -> Adapter | None:
        """The gallery's adopted adapter (kept in its database, so every process holding the gallery
        uses the same one); re-read when the gallery's blobs change."""
        stamp = self.gallery.blobs_version
        with self._lock:
            if stamp != self._adapter_from:
                data = self.gallery.blob(ADAPTER)
                self._adapter = Adapter.from_bytes(data) if data is not None else None
                self._adapter_from, self._mapped, self._calibrations = stamp, None, {}
                self._generation += 1
            return self._adapter

    def set_adapter(self, adapter: Adapter | None, report: AdapterReport | None = None) -> None:
        """Adopt ``adapter`` (stored in the gallery, one transaction), or drop the current one with None."""
        if adapter is None:
            self.gallery.set_blobs({ADAPTER: None, ADAPTER_REPORT: None})
        else:
            report = report or AdapterReport(True, "set by hand")
            self.gallery.set_blobs({ADAPTER: adapter.to_bytes(),
                                    ADAPTER_REPORT: json.dumps(report.to_dict(), indent=1).encode()})

    # ------------------------------------------------------------ scores
    def _space(self) -> tuple[int, int, np.ndarray, list[str]]:
        """(version, generation, vectors in the head's space, labels): a snapshot, cached per version
        when an adapter maps the vectors."""
        adapter = self.adapter
        with self._lock:
            generation, mapped = self._generation, self._mapped
        if adapter is None:
            version, vectors, labels = self.gallery.versioned_vectors()
            return version, generation, vectors, labels
        if mapped is None or mapped[:2] != (self.gallery.version, generation):
            version, vectors, labels = self.gallery.versioned_vectors()
            mapped = (version, generation, adapter.apply(vectors), labels)
            with self._lock:
                if generation == self._generation:
                    self._mapped = mapped
        return mapped

    def scores(self, queries: np.ndarray, head: str = "prototype", knn_k: int = 5,
               fingerprint: str | None = None) -> tuple[np.ndarray, list[str], int]:
        """(n, dim) -> class scores (n, C) over the gallery's classes in name order, the names, and
        the gallery version they come from. ``fingerprint``: the queries' encoder, if known (checked)."""
        check_head(head)
        adapter = self.adapter
        if adapter is None:
            found = self.gallery.lookup(queries, neighbours_needed(head, knn_k), fingerprint)
            return combine(head, found.proto_scores, found.sims, found.classes, knn_k), found.names, found.version
        self.gallery.check_fingerprint(fingerprint)
        queries = check_vectors(queries, self.gallery.dim)
        version, _, mapped, labels = self._space()
        if len(mapped) == 0:
            raise EmptyGallery(f"gallery {self.gallery.name!r} is empty; enroll at least one image first")
        class_scores, names = scores(head, adapter.apply(queries), mapped, labels, knn_k)
        return class_scores, names, version

    # ------------------------------------------------------------ thresholds
    def threshold(self, head: str = "prototype", threshold: float | None = None,
                  far: float | None = None) -> tuple[float | None, int | None, str | None]:
        """(threshold, version it was calibrated on, source): a given threshold as it is, else the
        calibrated one for ``far`` (default ``default_far``, 1%) in the head's space, or the
        encoder's reference one while the gallery is too small for its own."""
        check_head(head)
        if threshold is not None:
            return check_threshold(threshold), None, "given"
        far = check_far(self.default_far if far is None else far)
        key = (head, far)
        with self._lock:
            known = self._calibrations.get(key)
        if known is None:
            with self._first:
                with self._lock:
                    known = self._calibrations.get(key)
                if known is None:
                    known = self._calibrate(key)
        elif known[0] != (self.gallery.version, self._generation):
            if self.background is None:
                known = self._calibrate(key)
            else:
                self._refresh(key)
        space, calibration = known
        if (self.reference is not None and head == self.reference.head and self.adapter is None
                and calibration.impostors < OWN_FROM):
            return self.reference.threshold(far), space[0], "reference"
        if calibration.threshold is None:
            return None, None, None
        return calibration.threshold, space[0], "gallery"

    def calibration(self, head: str = "prototype", far: float | None = None) -> tuple[int, Calibration]:
        """(version, Calibration) last computed for ``head`` and ``far``, computed now if there is none."""
        self.threshold(head, None, far)
        with self._lock:
            space, calibration = self._calibrations[(head, check_far(self.default_far if far is None else far))]
        return space[0], calibration

    def _calibrate(self, key: tuple) -> tuple[tuple[int, int], Calibration]:
        head, far = key
        version, generation, vectors, labels = self._space()
        result = ((version, generation), calibrate(vectors, labels, far, head))
        with self._lock:
            current = self._calibrations.get(key)
            if generation == self._generation and (current is None or current[0] <= result[0]):
                self._calibrations[key] = result
        return result

    def _refresh(self, key: tuple) -> None:
        """Recompute ``key``'s threshold in the background, unless one is running or it is too soon."""
        with self._lock:
            if key in self._pending or time.monotonic() < self._not_before.get(key, 0.0):
                return
            self._pending.add(key)

        def run() -> None:
            started = time.monotonic()
            try:
                self._calibrate(key)
            except (GalleryClosed, EmptyGallery):
                pass  # the gallery went away or emptied meanwhile: nothing to calibrate
            except Exception:  # a background failure must not vanish silently
                log.exception("calibrating gallery %s failed", self.gallery.name)
            finally:
                took = time.monotonic() - started
                with self._lock:
                    self._pending.discard(key)
                    self._not_before[key] = time.monotonic() + took * (1 - DUTY) / DUTY

        self.background.submit(run)

    # ------------------------------------------------------------ answers
    @staticmethod
    def check_arguments(head: str, threshold: float | None, far: float | None) -> None:
        """Refuse a bad head, threshold or false-accept rate before any work is done."""
        check_head(head)
        if threshold is not None:
            check_threshold(threshold)
        if far is not None:
            check_far(far)

    def predict(self, queries: np.ndarray, k: int = 5, head: str = "prototype", threshold: float | None = None,
                far: float | None = None, knn_k: int = 5, fingerprint: str | None = None) -> Answer:
        """Per query: top-k classes with scores, ``unknown`` under the threshold, and the threshold."""
        check_k(k)
        self.check_arguments(head, threshold, far)
        class_scores, names, version = self.scores(queries, head, knn_k, fingerprint)
        limit, calibrated_on, source = self.threshold(head, threshold, far)
        return Answer(rank(class_scores, names, k, limit), version, calibrated_on, source)

    def verify(self, query: np.ndarray, label: str, threshold: float | None = None,
               far: float | None = None, fingerprint: str | None = None) -> dict:
        """Is ``query`` of class ``label``? Its prototype score against the threshold."""
        self.check_arguments("prototype", threshold, far)
        class_scores, names, version = self.scores(query, "prototype", fingerprint=fingerprint)
        if label not in names:
            raise UnknownLabel(f"no class {label!r} in gallery {self.gallery.name!r}")
        score = float(class_scores[0, names.index(label)])
        limit, calibrated_on, source = self.threshold("prototype", threshold, far)
        return {"label": label, "score": score, "threshold": limit, "match": limit is None or score >= limit,
                "version": version, "threshold_version": calibrated_on, "threshold_source": source}
