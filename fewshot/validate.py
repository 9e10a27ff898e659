"""What a gallery accepts: gallery names, labels, example ids, k and vectors. Each check returns the
value as stored or raises a domain error whose message says what to send instead."""
from __future__ import annotations

import re
import unicodedata

import numpy as np

from .errors import DimensionMismatch, InvalidArgument, InvalidLabel, InvalidName, InvalidVector, UnknownExample

MAX_LABEL = 200
MAX_K = 10_000
MAX_ID = 2**63 - 1  # the largest example id either store gives (a signed 64-bit integer)
GALLERY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # matched whole (fullmatch): no trailing newline
# What check_label accepts, as a JSON Schema pattern for the API's documents: something not blank, no
# control characters (C0, DEL, C1); the length limit is MAX_LABEL after stripping.
LABEL_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"


def check_name(name: object) -> str:
    """A gallery name: 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit."""
    if not isinstance(name, str) or not GALLERY_NAME.fullmatch(name):
        raise InvalidName(f"gallery name {str(name)[:70]!r} must be 1-64 letters, digits, '_', '.' or '-', "
                          "starting with a letter or digit")
    return name


def check_label(label: object) -> str:
    """A label as stored: stripped, 1..200 characters, no control characters (format characters such
    as the zero-width joiner of emoji sequences are fine)."""
    if not isinstance(label, str):
        raise InvalidLabel(f"a label must be text, got {type(label).__name__}")
    text = label.strip()
    if not text:
        raise InvalidLabel("a label must not be empty")
    if len(text) > MAX_LABEL:
        raise InvalidLabel(f"a label must be at most {MAX_LABEL} characters, got {len(text)}")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text):
        raise InvalidLabel(f"label {text[:40]!r} contains control characters")
    return text


def check_id(example_id: object, gallery: str) -> int:
    """An example id as the stores give them: a whole number from 0 to MAX_ID."""
    if isinstance(example_id, bool) or not isinstance(example_id, (int, np.integer)) \
            or not 0 <= example_id <= MAX_ID:
        raise UnknownExample(f"no example {example_id} in gallery {gallery!r}: ids are whole numbers "
                             f"from 0 to {MAX_ID}")
    return int(example_id)


def check_k(k: object, low: int = 1) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not low <= k <= MAX_K:
        raise InvalidArgument(f"k must be a whole number from {low} to {MAX_K}, got {k!r}")
    return int(k)


def check_vectors(vectors: np.ndarray, dim: int, keep_unit: bool = False) -> np.ndarray:
    """(n, dim) finite, non-zero -> float32 unit rows; raises DimensionMismatch / InvalidVector.
    ``keep_unit``: rows already of unit length (within float32 rounding) keep their exact values, so a
    gallery copied from another holds the same bytes."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim or x.shape[0] == 0:
        raise DimensionMismatch(f"expected vectors of shape (n, {dim}) with n >= 1, got {np.shape(vectors)}")
    if not np.isfinite(x).all():
        raise InvalidVector("vectors contain NaN or infinity")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InvalidVector("a vector is all zeros")
    if keep_unit and np.allclose(norms, 1.0, rtol=0, atol=1e-5):
        return np.ascontiguousarray(x)
    return np.ascontiguousarray(x / norms)


def same_length(labels_or_rows: int, vectors: int, what: str) -> None:
    """Two parallel inputs of a write must have one entry per vector."""
    if labels_or_rows != vectors:
        raise DimensionMismatch(f"{vectors} vectors but {labels_or_rows} {what}")
