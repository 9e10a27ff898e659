"""Open-set rejection calibrated on the gallery itself.

Impostor scores: each example against the other classes (as if its own class were not enrolled).
Genuine scores: each example against its own class with itself left out (classes with >= 2
examples). Both come from the same heads as recognition (``heads.combine``), leave-one-out in
closed form: the example's own prototype without it, its nearest neighbours without itself; one
batched pass instead of one head call per example.

The threshold is the impostor-score quantile that gives the requested false-accept rate, or a
normal fit of the impostor tail when that is higher: with a handful of impostor scores the
empirical quantile is just their maximum, and a new impostor beats it far more often than asked
(3 one-shot faces: ~56% false accepts at a requested 1%; with the fit ~29%).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from .errors import InvalidArgument
from .heads import class_index, class_sums, combine, nearest, neighbours_needed, normalize

FAR_RANGE = (1e-6, 0.5)  # a normal tail beyond 1e-6 is numerology; above 0.5 is not a threshold


@dataclass
class Calibration:
    threshold: float | None  # None: not enough classes to estimate impostors
    far: float
    genuine_accept_rate: float | None  # share of leave-one-out genuine scores >= threshold
    impostors: int
    genuines: int


def check_far(far: float) -> float:
    low, high = FAR_RANGE
    if not (isinstance(far, (int, float)) and math.isfinite(far) and low <= far <= high):
        raise InvalidArgument(f"far (false-accept rate) must be a number from {low:g} to {high:g}, got {far!r}")
    return float(far)


def check_threshold(threshold: float) -> float:
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise InvalidArgument(f"threshold must be a finite number, got {threshold!r}")
    return float(threshold)


def loo_scores(embeddings: np.ndarray, labels, head: str = "prototype", max_examples: int = 500,
               seed: int = 0, k: int = 5, **options) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) score arrays from up to ``max_examples`` sampled examples, leave-one-out."""
    x = np.asarray(embeddings, np.float32)
    names, index = class_index(labels)
    if len(x) < 2:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    chosen = np.random.default_rng(seed).permutation(len(x))[:max_examples]
    sums = class_sums(x, index, len(names))
    counts = np.bincount(index, minlength=len(names))
    queries, own = x[chosen], index[chosen]
    proto = queries @ normalize(sums).T
    rows = np.arange(len(chosen))
    proto[rows, own] = np.einsum("ij,ij->i", queries, normalize(sums[own] - queries))  # own class without it
    m = min(neighbours_needed(head, k), len(x) - 1)
    if m:
        sims, found = nearest(queries, x, m, exclude=chosen)
        class_scores = combine(head, proto, sims, index[found], k, **options)
    else:
        class_scores = combine(head, proto, None, None)
    shared = counts[own] > 1  # a one-example class has no genuine score
    genuine = class_scores[rows[shared], own[shared]]
    others = np.array(class_scores, np.float32, copy=True)
    others[rows, own] = -np.inf
    impostor = others.max(axis=1) if len(names) > 1 else np.zeros(0, np.float32)
    return genuine.astype(np.float32), impostor.astype(np.float32)


def calibrate(embeddings: np.ndarray, labels, far: float = 0.01, head: str = "prototype",
              **options) -> Calibration:
    """The threshold under which a best score means ``unknown``, for a false-accept rate ``far``."""
    far = check_far(far)
    genuine, impostor = loo_scores(np.asarray(embeddings, np.float32), labels, head, **options)
    if len(impostor) == 0:
        return Calibration(None, far, None, 0, len(genuine))
    threshold = float(np.quantile(impostor, 1.0 - far, method="higher"))
    if len(impostor) >= 2:  # few scores: the empirical quantile is just their max and under-states the tail
        tail = NormalDist().inv_cdf(1.0 - far)
        threshold = max(threshold, float(impostor.mean() + tail * impostor.std(ddof=1)))
    threshold = float(np.nextafter(np.float32(threshold), np.float32(np.inf)))  # strictly above
    accept = float((genuine >= threshold).mean()) if len(genuine) else None
    return Calibration(threshold, far, accept, len(impostor), len(genuine))
