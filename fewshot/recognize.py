"""Recognition over a gallery: the heads of ``fewshot.heads`` on a gallery's index, and open-set
thresholds that never hold a query up.

Without an adapter a query reads its prototype cosines and nearest examples from the gallery in one
consistent lookup (``Gallery.lookup``) and the head combines them (``heads.combine``): nothing is
copied per query. With an adopted adapter (see ``fewshot.adapt``) queries and examples are mapped
through it first; the mapped examples are cached per gallery version and the same heads run by
brute force (``heads.scores``).

Thresholds: a calibrated threshold belongs to the gallery version it was computed from, which every
answer reports; ``fewshot.thresholds`` decides when each is (re)computed, off the query path. By
default a gallery's own threshold is on the ``margin`` (best score minus half the runner-up's, see
``fewshot.calibration``); a given or reference threshold is on the best ``score``; ``Ask.decision``
chooses either.

A gallery too small to calibrate itself (fewer than ``reference.OWN_FROM`` impostor scores) uses its
encoder's reference operating point for the prototype head when it has one (``fewshot.reference``):
three one-shot classes give three impostor scores, no basis for a 1% false-accept threshold.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from .adapt import Adapter, AdapterReport
from .calibration import Calibration, calibrate_all, check_far, check_statistic, check_threshold
from .errors import EmptyGallery, UnknownLabel
from .gallery import Gallery
from .validate import check_k, check_vectors
from .heads import check_head, combine, neighbours_needed, rank, scores
from .reference import OWN_FROM, ReferencePoint
from .thresholds import Thresholds

DEFAULT_FAR = 0.01
ADAPTER, ADAPTER_REPORT = "adapter.npy", "adapter.json"  # the gallery's blobs


@dataclass(frozen=True)
class Ask:
    """What a query asks for, checked once (``Ask.checked``) before any work is done."""
    k: int = 5
    head: str = "prototype"
    threshold: float | None = None
    far: float | None = None
    knn_k: int = 5
    decision: str | None = None  # score or margin; None: margin on the gallery's own threshold, else score

    @classmethod
    def checked(cls, k: int = 5, head: str = "prototype", threshold: float | None = None,
                far: float | None = None, knn_k: int = 5, decision: str | None = None) -> "Ask":
        """Refuse a bad k, head, threshold, false-accept rate or decision statistic."""
        return cls(check_k(k), check_head(head), None if threshold is None else check_threshold(threshold),
                   None if far is None else check_far(far), check_k(knn_k),
                   None if decision is None else check_statistic(decision))


@dataclass(frozen=True)
class Limit:
    """The threshold a query is decided by, and what it is."""
    threshold: float | None  # None: no threshold (nothing is unknown)
    version: int | None  # the gallery version it was calibrated on; None: given or none
    source: str | None  # "given", "gallery", "reference" or None
    statistic: str = "score"  # what it thresholds: the best "score" or the "margin" over the runner-up


@dataclass
class Answer:
    results: list[dict]  # per query: matches, unknown, threshold (see heads.rank)
    version: int  # the gallery version the scores come from
    threshold_version: int | None  # the version the threshold was calibrated on; None: given or none
    threshold_source: str | None = None  # "given", "gallery" (its own calibration), "reference" or None


class Recognizer:
    def __init__(self, gallery: Gallery, background: Executor | None = None, default_far: float = DEFAULT_FAR,
                 reference: ReferencePoint | None = None) -> None:
        self.gallery, self.default_far, self.reference = gallery, check_far(default_far), reference
        self.fingerprint = gallery.fingerprint  # the encoder this recognizer's reference point belongs to
        self._lock = threading.Lock()
        self._generation = 0  # bumped when the adapter changes: part of every cache key
        self._mapped: tuple | None = None  # (version, generation, mapped vectors, labels)
        self._adapter: Adapter | None = None
        self._adapter_from: int | None = None  # the gallery's blobs version it was read at
        self.thresholds = Thresholds(self._calibrate, lambda: (self.gallery.version, self._generation),
                                     background, gallery.name)

    @property
    def adapter(self) -> Adapter | None:
        """The gallery's adopted adapter (kept in its database, so every process holding the gallery
        uses the same one); re-read when the gallery's blobs change."""
        stamp, blobs = self.gallery.blobs()
        with self._lock:
            if stamp != self._adapter_from:
                data = blobs.get(ADAPTER)
                self._adapter = Adapter.from_bytes(data) if data is not None else None
                self._adapter_from, self._mapped = stamp, None
                self._generation += 1
                self.thresholds.clear()
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
        return self._scores(queries, check_head(head), knn_k, fingerprint)

    def _scores(self, queries: np.ndarray, head: str, knn_k: int,
                fingerprint: str | None) -> tuple[np.ndarray, list[str], int]:
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
    def threshold(self, head: str = "prototype", threshold: float | None = None, far: float | None = None,
                  decision: str | None = None) -> Limit:
        """A given threshold as it is (on the score unless ``decision`` says margin), else the calibrated
        one for ``far`` (default ``default_far``, 1%) in the head's space (on the margin unless
        ``decision`` says score), or the encoder's reference one (on the score) while the gallery is too
        small for its own."""
        return self.limit(Ask.checked(head=head, threshold=threshold, far=far, decision=decision))

    def limit(self, ask: Ask) -> Limit:
        """``threshold`` for arguments already checked."""
        if ask.threshold is not None:
            return Limit(ask.threshold, None, "given", ask.decision or "score")
        head, far = ask.head, self.default_far if ask.far is None else ask.far
        space, calibrations = self.thresholds.get((head, far))
        calibration = calibrations[ask.decision or "margin"]
        small = calibration.impostors < OWN_FROM
        if (self.reference is not None and head == self.reference.head and self.adapter is None and small
                and ask.decision != "margin"):
            return Limit(self.reference.threshold(far), space[0], "reference", "score")
        if ask.decision is None and small:  # too few impostors to trust a margin's tail: the score's
            calibration = calibrations["score"]
        if calibration.threshold is None:
            return Limit(None, None, None, calibration.statistic)
        return Limit(calibration.threshold, space[0], "gallery", calibration.statistic)

    def calibration(self, head: str = "prototype", far: float | None = None,
                    statistic: str = "margin") -> tuple[int, Calibration]:
        """(version, Calibration) last computed for ``head``, ``far`` and ``statistic``, computed now if
        there is none."""
        far = check_far(self.default_far if far is None else far)
        space, calibrations = self.thresholds.get((check_head(head), far))
        return space[0], calibrations[check_statistic(statistic)]

    def _calibrate(self, key: tuple) -> tuple[tuple[int, int], dict[str, Calibration]]:
        head, far = key
        version, generation, vectors, labels = self._space()
        return (version, generation), calibrate_all(vectors, labels, far, head)

    # ------------------------------------------------------------ answers
    def predict(self, queries: np.ndarray, k: int = 5, head: str = "prototype", threshold: float | None = None,
                far: float | None = None, knn_k: int = 5, fingerprint: str | None = None,
                decision: str | None = None) -> Answer:
        """Per query: top-k classes with scores, ``unknown`` under the threshold, the threshold and the
        value it was compared with."""
        return self.answer(queries, Ask.checked(k, head, threshold, far, knn_k, decision), fingerprint)

    def answer(self, queries: np.ndarray, ask: Ask, fingerprint: str | None = None) -> Answer:
        """``predict`` for arguments already checked."""
        class_scores, names, version = self._scores(queries, ask.head, ask.knn_k, fingerprint)
        limit = self.limit(ask)
        return Answer(rank(class_scores, names, ask.k, limit.threshold, limit.statistic), version, limit.version,
                      limit.source)

    def verify(self, query: np.ndarray, label: str, threshold: float | None = None,
               far: float | None = None, fingerprint: str | None = None) -> dict:
        """Is ``query`` of class ``label``? Its prototype score against the score threshold."""
        ask = Ask.checked(threshold=threshold, far=far, decision="score")
        class_scores, names, version = self._scores(query, "prototype", ask.knn_k, fingerprint)
        if label not in names:
            raise UnknownLabel(f"no class {label!r} in gallery {self.gallery.name!r}")
        score = float(class_scores[0, names.index(label)])
        limit = self.limit(ask)
        return {"label": label, "score": score, "threshold": limit.threshold,
                "match": limit.threshold is None or score >= limit.threshold, "version": version,
                "threshold_version": limit.version, "threshold_source": limit.source}
