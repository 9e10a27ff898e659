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
# Bidirectional embedding, override and isolate controls: they make a label display as something else
# ("abc\u202egpj.exe" shows as "abcexe.jpg"), so no label may carry one.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Characters that show nothing (besides white space): format characters and a few fillers. A label
# must have something else; they are stripped from its ends (inside, such as the zero-width joiner of
# emoji sequences, they stay).
INVISIBLE = frozenset("\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b\u200c\u200d\u200e\u200f"
                      "\u2060\u2061\u2062\u2063\u2064\u3164\ufeff\uffa0")
_NO_CONTROL = "\\x00-\\x1f\\x7f-\\x9f\\u202a-\\u202e\\u2066-\\u2069"
_SHOWS = _NO_CONTROL + "\\s" + "".join(f"\\u{ord(c):04x}" for c in sorted(INVISIBLE))
# What check_label accepts, as a JSON Schema pattern for the API's documents: something visible, no
# control characters (C0, DEL, C1) and no bidi controls; the length limit is MAX_LABEL after stripping.
LABEL_PATTERN = f"^[^{_NO_CONTROL}]*[^{_SHOWS}][^{_NO_CONTROL}]*$"


def check_name(name: object) -> str:
    """A gallery name: 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit."""
    if not isinstance(name, str) or not GALLERY_NAME.fullmatch(name):
        raise InvalidName(f"gallery name {str(name)[:70]!r} must be 1-64 letters, digits, '_', '.' or '-', "
                          "starting with a letter or digit")
    return name


def check_label(label: object) -> str:
    """A label as stored: NFC-normalised (``café`` typed either way is one class), stripped of white
    space and invisible characters at its ends, 1..200 characters, no control or bidi characters, not
    only invisible ones. Any other character is fine, ``/`` included (encode it as %2F in a URL path)."""
    if not isinstance(label, str):
        raise InvalidLabel(f"a label must be text, got {type(label).__name__}")
    text = unicodedata.normalize("NFC", label).strip()
    while text and (text[0] in INVISIBLE or text[-1] in INVISIBLE):
        text = text.strip("".join(INVISIBLE)).strip()
    if not text:
        raise InvalidLabel("a label must not be empty (or only invisible characters, such as zero-width spaces)"
                           if label.strip() else "a label must not be empty")
    if len(text) > MAX_LABEL:
        raise InvalidLabel(f"a label must be at most {MAX_LABEL} characters, got {len(text)}")
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cs") or ch in BIDI_CONTROLS:
            name = unicodedata.name(ch, "a control character")
            raise InvalidLabel(f"label {text[:40]!r} contains U+{ord(ch):04X} ({name}); labels may not hold "
                               "control or bidirectional-override characters: remove it")
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
