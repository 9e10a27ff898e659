"""Which face of an enrollment photo to enroll, and whether it is good enough to become an example.

An example is compared with every later query, so a poor one costs more than a refused upload: the
face enrolled must be large enough, sharp enough and clearly a face; when a photo holds several faces
that pass, the caller says which (``face=largest|center|best`` or a ``box``), never a silent guess.

Limits, in the upload's pixels and the detector's own units:

- width >= 60 px: below it the 150 px chip (whose face spans 100 px) is mostly interpolation;
- detector score >= 0.2: dlib's HOG detector takes a margin above 0 as a face; enrolling asks a little
  more (ORL's faces: all pass; LFW's labelled faces: ~99% pass; scikit-image's astronaut photo: her face
  1.6, the mission patch on her suit 0.07);
- sharpness >= 5: the variance of the Laplacian of the grey chip (LFW's faces: 95% above 12; the same
  blurred by a Gaussian of 1.5 px per 250: median 4.8).

``Limits`` carries them: the service's ``FEWSHOT_FACE_MIN_SCORE`` and a request's ``min_score`` change the
detector score asked for (dlib's CNN detector, ``face:cnn``, scores on its own scale: faces ~1, and it
takes nothing under 0 for a face). ``quality=off`` (``check=False``) skips the limits; the choice among
several faces still applies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import FaceQuality, InvalidArgument, NoFace, SeveralFaces
from .images import Instance

MIN_WIDTH, MIN_SCORE, MIN_SHARPNESS = 60, 0.2, 5.0
CHOICES = ("largest", "center", "best")


@dataclass(frozen=True)
class Limits:
    """What a face must reach to be enrolled (the service's settings and a request may change them)."""
    width: int = MIN_WIDTH
    score: float = MIN_SCORE
    sharpness: float = MIN_SHARPNESS

    def with_score(self, score: float | None) -> "Limits":
        """These limits with another minimum detector score (None: unchanged); refuses a non-number."""
        if score is None:
            return self
        if not (isinstance(score, (int, float)) and np.isfinite(score)):
            raise InvalidArgument(f"min_score must be a finite number, got {score!r}")
        return Limits(self.width, float(score), self.sharpness)


@dataclass(frozen=True)
class Quality:
    width: int  # px of the upload
    score: float | None  # the detector's; None for a given crop (face:crop)
    sharpness: float

    def problems(self, limits: Limits = Limits()) -> list[str]:
        found = []
        if self.width < limits.width:
            found.append(f"face {self.width} px wide; at least {limits.width} px")
        if self.score is not None and self.score < limits.score:
            found.append(f"detector score {self.score:.2f}; at least {limits.score:g} (it may not be a face)")
        if self.sharpness < limits.sharpness:
            found.append(f"sharpness {self.sharpness:.1f}; at least {limits.sharpness:g} (blurred or out of focus)")
        return found


def measure(face: Instance) -> Quality:
    grey = face.pixels.astype(np.float32).mean(axis=0)
    laplacian = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return Quality(face.box[2] - face.box[0], face.score, round(float(laplacian.var()), 2))


def describe(face: Instance, limits: Limits = Limits()) -> dict:
    """A face as an error lists it: its box, score and measurements."""
    quality = measure(face)
    return {"box": list(face.box), "score": face.score, "width": quality.width, "sharpness": quality.sharpness,
            "problems": quality.problems(limits),
            "landmarks": [list(point) for point in face.landmarks] if face.landmarks else None}


def parse_box(text: str | None) -> tuple[int, int, int, int] | None:
    """``"x0,y0,x1,y1"`` (the upload's pixels) -> a box; raises ``InvalidArgument``."""
    if text is None:
        return None
    try:
        x0, y0, x1, y1 = (int(round(float(v))) for v in text.split(","))
    except ValueError:
        raise InvalidArgument(f"box={text!r}: give x0,y0,x1,y1 in the image's pixels, e.g. "
                              "box=120,80,260,240") from None
    if x1 <= x0 or y1 <= y0:
        raise InvalidArgument(f"box={text!r}: x1 must exceed x0 and y1 exceed y0")
    return x0, y0, x1, y1


def choose(faces: list[Instance], size: tuple[int, int], face: str | None = None,
           box: tuple[int, int, int, int] | None = None, check: bool = True, limits: Limits = Limits()) -> Instance:
    """The face to enroll of ``faces`` (found in an image of ``size`` = (width, height), upload pixels).

    Raises ``NoFace``; ``FaceQuality`` when none passes the limits (``check``); ``SeveralFaces`` when
    several pass and neither ``face`` nor ``box`` says which."""
    if face is not None and face not in CHOICES:
        raise InvalidArgument(f"face={face!r}: choose {', '.join(CHOICES)}, or give box=x0,y0,x1,y1")
    if not faces:
        raise NoFace("no face found in the image: use a photo where the face is frontal and at least ~40 px "
                     "wide, or crop closer to it")
    if box is not None:
        best = max(faces, key=lambda f: _overlap(f.box, box))
        if _overlap(best.box, box) < 0.3:
            raise SeveralFaces(f"no face found in box={','.join(map(str, box))}", [describe(f, limits) for f in faces])
        candidates = [best]
    else:
        candidates = faces
    good = [f for f in candidates if not check or not measure(f).problems(limits)]
    if not good:
        each = ["; ".join(measure(f).problems(limits)) for f in candidates]
        reasons = each[0] if len(each) == 1 else f"none of its {len(each)} faces passes ({' | '.join(each)})"
        raise FaceQuality(f"the face is not good enough to enroll: {reasons}. Use a sharper, closer, frontal "
                          "photo, or quality=off to enroll it anyway", [describe(f, limits) for f in candidates])
    if len(good) == 1:
        return good[0]
    if face == "largest":
        return max(good, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
    if face == "best":
        return max(good, key=lambda f: f.score if f.score is not None else 0.0)
    if face == "center":
        return min(good, key=lambda f: f.off_centre(size))
    raise SeveralFaces(f"the image holds {len(good)} faces that could be enrolled: say which with "
                       "face=largest|center|best or box=x0,y0,x1,y1", [describe(f, limits) for f in faces])


def _overlap(a: tuple, b: tuple) -> float:
    """Intersection over union of two boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
