"""Open-set rejection calibrated on the gallery itself.

Impostor scores: each example against the other classes (as if its own class were not enrolled).
Genuine scores: each example against its own class with itself left out (classes with >= 2
examples). Both come from the same heads as recognition (``heads.combine``), leave-one-out in
closed form: the example's own prototype without it, its nearest neighbours without itself; one
batched pass instead of one head call per example.

What is thresholded (``STATISTICS``): ``score``, the best class score, or ``margin``, the best
score minus ``MARGIN_WEIGHT`` times the runner-up's. In a gallery of many people a stranger's best
score is the highest of many draws and often lands close to a second one, while a genuine probe
stands out from the rest: on LFW people A-J (858 enrolled one photo each, 1% asked, both with the
bound below) the margin accepted 70.1% of the enrolled people and left 98.9% of strangers unknown,
the best score 58.3% and 99.3% (``docs/benchmarks.md``, ``bench/faces_wild.py``). For 1:N the false-accept rate is the share of strangers accepted as
*someone*.

The threshold is a 95% upper confidence bound on the requested false-accept rate: the k-th highest
impostor value, for the largest k at which the chance that the true rate at that threshold exceeds
``far`` is at most 5% (binomial), or a normal fit of the impostor tail when that is higher. The
plain quantile is right only on average: with 858 impostor values a requested 1% came out at
1.5-1.6% on strangers half of the time. With a handful of impostor scores the bound is their
maximum, and the normal fit guards the tail (3 one-shot faces: ~56% false accepts at a requested
1% with the maximum alone; with the fit ~29%).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from .errors import InvalidArgument
from .heads import (MARGIN_WEIGHT, STATISTICS, check_statistic, class_index, class_sums, combine, decision_values,
                    nearest, neighbours_needed, normalize)

FAR_RANGE = (1e-6, 0.5)  # a normal tail beyond 1e-6 is numerology; above 0.5 is not a threshold
CONFIDENCE = 0.95  # the threshold keeps the false-accept rate under the requested one with this confidence


@dataclass
class Calibration:
    threshold: float | None  # None: not enough classes to estimate impostors
    far: float
    statistic: str  # what the threshold is on: "score" or "margin"
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


def loo_scores(embeddings: np.ndarray, labels, head: str = "prototype", statistic: str = "score",
               **options) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) values of one ``statistic``: see ``loo_values``."""
    return loo_values(embeddings, labels, head, **options)[check_statistic(statistic)]


def loo_values(embeddings: np.ndarray, labels, head: str = "prototype", max_examples: int = 500,
               seed: int = 0, k: int = 5, **options) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per statistic, (genuine, impostor) decision values from up to ``max_examples`` sampled examples,
    leave-one-out, in one pass. A genuine value is its own class's score (for ``margin``: minus the
    weight times the best other class's; -inf where another class beats its own, as such a probe is
    not accepted as itself)."""
    x = np.asarray(embeddings, np.float32)
    names, index = class_index(labels)
    empty = np.zeros(0, np.float32)
    if len(x) < 2:
        return {statistic: (empty, empty) for statistic in STATISTICS}
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
    genuine = class_scores[rows, own].astype(np.float32)
    if len(names) == 1:
        return {statistic: (genuine[shared], empty) for statistic in STATISTICS}
    others = np.array(class_scores, np.float32, copy=True)
    others[rows, own] = -np.inf
    best_other = others.max(axis=1)
    margin = np.where(genuine >= best_other, genuine - MARGIN_WEIGHT * best_other, -np.inf).astype(np.float32)
    return {"score": (genuine[shared], best_other.astype(np.float32)),
            "margin": (margin[shared], decision_values(others, "margin").astype(np.float32))}


def bounded_quantile(values: np.ndarray, far: float, confidence: float = CONFIDENCE) -> float:
    """The k-th highest of ``values`` for the largest k such that, were the true rate of values above
    it ``far``, at most ``1 - confidence`` of samples this size would hold fewer than k above it."""
    ordered = np.sort(np.asarray(values, np.float64))[::-1]
    n = len(ordered)
    i = np.arange(n + 1)
    log_pmf = (np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in i])
               + i * math.log(far) + (n - i) * math.log1p(-far))
    below = np.cumsum(np.exp(log_pmf))  # below[j] = P(B <= j), B ~ Binomial(n, far)
    k = int(np.searchsorted(below, 1.0 - confidence, side="right"))  # the largest k with P(B <= k - 1) <= 1 - c
    return float(ordered[max(k - 1, 0)])


def calibrate(embeddings: np.ndarray, labels, far: float = 0.01, head: str = "prototype",
              statistic: str = "score", **options) -> Calibration:
    """The threshold under which a query's ``statistic`` means ``unknown``, for a false-accept rate ``far``."""
    return calibrate_all(embeddings, labels, far, head, **options)[check_statistic(statistic)]


def calibrate_all(embeddings: np.ndarray, labels, far: float = 0.01, head: str = "prototype",
                  **options) -> dict[str, Calibration]:
    """``calibrate`` for every statistic, from one leave-one-out pass."""
    far = check_far(far)
    values = loo_values(np.asarray(embeddings, np.float32), labels, head, **options)
    return {statistic: _threshold(genuine, impostor, far, statistic)
            for statistic, (genuine, impostor) in values.items()}


def _threshold(genuine: np.ndarray, impostor: np.ndarray, far: float, statistic: str) -> Calibration:
    if len(impostor) == 0:
        return Calibration(None, far, statistic, None, 0, len(genuine))
    threshold = bounded_quantile(impostor, far)
    if len(impostor) >= 2:  # few scores: the bound is just their max and under-states the tail
        tail = NormalDist().inv_cdf(1.0 - far)
        threshold = max(threshold, float(impostor.mean() + tail * impostor.std(ddof=1)))
    threshold = float(np.nextafter(np.float32(threshold), np.float32(np.inf)))  # strictly above
    accept = float((genuine >= threshold).mean()) if len(genuine) else None
    return Calibration(threshold, far, statistic, accept, len(impostor), len(genuine))
