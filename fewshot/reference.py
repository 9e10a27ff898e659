"""Reference operating points: thresholds an encoder's galleries use until they can calibrate their own.

A gallery of three one-shot classes has three impostor scores: too few to place a 1% false-accept
threshold. An encoder measured once on labelled reference images that are not test data ships its
impostor-score quantiles by false-accept rate (``fewshot/reference_data/<encoder>.json``, written by the
bench that measured them). ``Recognizer`` uses the reference threshold for the prototype head while
the gallery's own leave-one-out calibration has fewer than ``OWN_FROM`` impostor scores, then the
gallery's own.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REFERENCE_DIR = Path(__file__).resolve().parent / "reference_data"
FARS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 0.5)
OWN_FROM = 100  # impostor scores (sampled examples of a gallery with >= 2 classes) to trust its own threshold


@dataclass
class ReferencePoint:
    """Impostor-score thresholds by false-accept rate, measured on ``data`` for one fingerprint."""
    fingerprint: str
    head: str
    thresholds: dict[float, float]
    data: str

    def threshold(self, far: float) -> float:
        """Interpolated in log(FAR) between the measured rates (clamped at the ends)."""
        fars = sorted(self.thresholds)
        if far <= fars[0]:
            return self.thresholds[fars[0]]
        if far >= fars[-1]:
            return self.thresholds[fars[-1]]
        hi = next(i for i, f in enumerate(fars) if f >= far)
        lo = hi - 1
        w = (math.log(far) - math.log(fars[lo])) / (math.log(fars[hi]) - math.log(fars[lo]))
        return float((1 - w) * self.thresholds[fars[lo]] + w * self.thresholds[fars[hi]])

    def to_dict(self) -> dict:
        return {"head": self.head, "data": self.data, "thresholds": {f"{k:g}": v for k, v in self.thresholds.items()}}


def load_reference(name: str, fingerprint: str) -> ReferencePoint | None:
    """The shipped reference point of encoder ``name``, if there is one for exactly these weights."""
    path = REFERENCE_DIR / f"{name.split(':')[0]}.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if meta.get("fingerprint") != fingerprint:
        return None
    return ReferencePoint(fingerprint, meta["head"], {float(k): float(v) for k, v in meta["thresholds"].items()},
                          meta["data"])


def far_thresholds(x: np.ndarray, labels) -> tuple[dict[float, float], int]:
    """Impostor cosines between examples of different labels -> (threshold by FAR, pair count).
    One comparison each: a one-shot class's prototype is its example."""
    labels = np.asarray(labels)
    sims = x @ x.T
    different = labels[:, None] != labels[None, :]
    impostor = sims[np.triu(different, 1)]
    return {far: float(np.quantile(impostor, 1 - far, method="higher")) for far in FARS}, int(len(impostor))
