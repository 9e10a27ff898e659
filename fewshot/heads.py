"""Few-shot heads: pure functions on unit vectors.

Each head maps (queries (q, d), support (n, d), support labels) to class scores (q, C) over the
sorted class names. Higher is more similar; ``unknown`` is decided by a threshold on the best score.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def center(x: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """SimpleShot's CL2N: subtract a reference mean, re-normalise (identity when ``mean`` is None)."""
    return x if mean is None else normalize(np.asarray(x, np.float32) - mean)


def class_index(labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Sorted class names and each example's class number."""
    names, index = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    return [str(name) for name in names], index


def prototypes(support: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Mean embedding per label, re-normalised: ((C, d), names in row order)."""
    names, index = class_index(labels)
    sums = np.zeros((len(names), support.shape[1]), np.float32)
    np.add.at(sums, index, support)
    return normalize(sums), names


def prototype_scores(queries, support, labels, **_) -> tuple[np.ndarray, list[str]]:
    """Cosine to each class's re-normalised mean."""
    protos, names = prototypes(support, labels)
    return queries @ protos.T, names


def knn_scores(queries, support, labels, k: int = 5, **_) -> tuple[np.ndarray, list[str]]:
    """Similarity-weighted vote of the ``k`` nearest examples: per class, the sum of its
    neighbours' cosines over k (a 1-NN cosine when k=1)."""
    names, index = class_index(labels)
    k = max(1, min(k, len(support)))
    sims = queries @ support.T
    nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    scores = np.zeros((len(queries), len(names)), np.float32)
    rows = np.repeat(np.arange(len(queries)), k)
    np.add.at(scores, (rows, index[nearest].ravel()), sims[rows, nearest.ravel()])
    return scores / k, names


CACHE_BETA = 5.5  # Tip-Adapter's sharpness: exp(-beta (1 - cos))


def cache_scores(queries, support, labels, alpha: float = 1.0, beta: float = CACHE_BETA,
                 **_) -> tuple[np.ndarray, list[str]]:
    """Tip-Adapter-style, training-free: prototype cosine + alpha * sum over the class's examples
    of exp(-beta * (1 - cosine))."""
    proto, names = prototype_scores(queries, support, labels)
    _, index = class_index(labels)
    affinity = np.exp(-beta * (1.0 - queries @ support.T))
    one_hot = np.zeros((len(support), len(names)), np.float32)
    one_hot[np.arange(len(support)), index] = 1.0
    return proto + alpha * affinity @ one_hot, names


HEADS: dict[str, Callable[..., tuple[np.ndarray, list[str]]]] = {
    "prototype": prototype_scores,
    "knn": knn_scores,
    "cache": cache_scores,
}


def scores(head: str, queries: np.ndarray, support: np.ndarray, labels: Sequence[str],
           **options) -> tuple[np.ndarray, list[str]]:
    """Dispatch to a head by name; raises ValueError naming the heads that exist."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")
    return HEADS[head](np.asarray(queries, np.float32), np.asarray(support, np.float32), labels, **options)


def rank(class_scores: np.ndarray, names: Sequence[str], k: int, threshold: float | None) -> list[dict]:
    """Per query: the top-k classes with scores, and ``unknown`` when the best is under the threshold."""
    k = min(k, len(names))
    order = np.argsort(-class_scores, axis=1)[:, :k]
    out = []
    for row, top in zip(class_scores, order):
        best = float(row[top[0]]) if k else float("-inf")
        out.append({"matches": [{"label": names[j], "score": float(row[j])} for j in top],
                    "unknown": threshold is not None and best < threshold, "threshold": threshold})
    return out
