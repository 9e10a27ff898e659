"""Open-set rejection calibrated on the gallery itself.

Impostor scores: each example against the other classes (as if its own class were not enrolled).
Genuine scores: each example against its own class with itself left out (classes with >= 2
examples). The threshold is the impostor-score quantile that gives the requested false-accept rate,
or a normal fit of the impostor tail when that is higher: with a handful of impostor scores the
empirical quantile is just their maximum, and a new impostor beats it far more often than asked
(3 one-shot faces: ~56% false accepts at a requested 1%; with the fit ~29%).
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from .heads import class_index, scores


@dataclass
class Calibration:
    threshold: float | None  # None: not enough classes to estimate impostors
    far: float
    genuine_accept_rate: float | None  # share of leave-one-out genuine scores >= threshold
    impostors: int
    genuines: int


def loo_scores(embeddings: np.ndarray, labels, head: str = "prototype", max_examples: int = 500,
               seed: int = 0, **options) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) score arrays from up to ``max_examples`` sampled examples."""
    names, index = class_index(labels)
    labels = np.asarray(names, dtype=object)[index]
    chosen = np.random.default_rng(seed).permutation(len(embeddings))[:max_examples]
    genuine, impostor = [], []
    for i in chosen:
        keep = np.arange(len(embeddings)) != i
        if keep.sum() == 0:
            continue
        row, row_names = scores(head, embeddings[i:i + 1], embeddings[keep], labels[keep], **options)
        own = [j for j, name in enumerate(row_names) if name == labels[i]]
        if own:
            genuine.append(row[0, own[0]])
        others = np.delete(row[0], own)
        if len(others):
            impostor.append(others.max())
    return np.asarray(genuine, np.float32), np.asarray(impostor, np.float32)


def calibrate(embeddings: np.ndarray, labels, far: float = 0.01, head: str = "prototype",
              **options) -> Calibration:
    """The threshold under which a best score means ``unknown``, for a false-accept rate ``far``."""
    if not 0.0 < far < 1.0:
        raise ValueError(f"false-accept rate must be in (0, 1), got {far}")
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
