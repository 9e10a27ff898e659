"""The training data as the network sees it: the held-out class split, every image decoded once,
and the label-preserving views (augmentations, quarter turns) that get cached."""
from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm

from ..errors import InvalidSource
from ..images import Preprocessing
from ..runtimes import owned_cores


# ---------------------------------------------------------------- data
def classes_split(labels: np.ndarray, val_fraction: float, rng: np.random.Generator):
    """Class names -> (train, stop, judge): the held-out classes, halved, never seen in training."""
    names = np.unique(labels)
    order = rng.permutation(names)
    n_val = int(round(len(names) * val_fraction))
    if n_val < 4 or len(names) - n_val < 2:
        raise InvalidSource(f"{len(names)} classes with --val-classes {val_fraction} leaves {n_val} held-out "
                            "classes; fine-tuning needs >= 2 training classes and >= 4 held-out classes "
                            "(2 to stop early, 2 to judge): give more classes or raise --val-classes")
    held = order[:n_val]
    return set(order[n_val:]), set(held[: n_val // 2]), set(held[n_val // 2:])


def decode_all(items, prep: Preprocessing, workers: int | None, progress: bool, desc: str):
    """Items -> (uint8 pixels (n, 3, H, W), kept item indices); unreadable images are skipped."""
    from ..embed import PixelDecoder

    pixels, kept = [], []
    with PixelDecoder(prep, workers=owned_cores() if workers is None else workers) as decode:
        for i, (pix, error, _) in enumerate(tqdm(decode(items), total=len(items), desc=desc, unit="img",
                                              disable=not progress, dynamic_ncols=True)):
            if error is None:
                pixels.append(pix)
                kept.append(i)
    if not pixels:
        raise InvalidSource("none of the images could be read")
    return np.stack(pixels), np.asarray(kept)


def augment_kind(pixels: np.ndarray, asked: str) -> str:
    if asked != "auto":
        return asked
    sample = pixels[:: max(1, len(pixels) // 256)].astype(np.int16)
    grey = np.abs(sample[:, 0] - sample[:, 1]).max() <= 2 and np.abs(sample[:, 1] - sample[:, 2]).max() <= 2
    return "shapes" if grey else "photos"  # no mirror images or colour changes for glyphs, scans, x-rays


def augment(x, kind: str, generator):
    """Random label-preserving view of a float batch (n, 3, H, W): small affine warp for every kind;
    photos also get a horizontal flip and brightness/contrast jitter."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]

    def uniform(*shape, spread):
        return (torch.rand(*shape, generator=generator) * 2 - 1) * spread

    angle, scale = uniform(n, spread=math.radians(10)), 1 + uniform(n, spread=0.1)
    shear = uniform(n, spread=math.radians(8))
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / scale, (-torch.sin(angle) + shear) / scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / scale, torch.cos(angle) / scale
    theta[:, :, 2] = uniform(n, 2, spread=0.08)
    if kind == "photos":
        flip = torch.rand(n, generator=generator) < 0.5
        theta[flip, 0, :2] *= -1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if kind == "photos":
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        contrast, brightness = 1 + uniform(n, 1, 1, 1, spread=0.2), uniform(n, 1, 1, 1, spread=0.2) * 255
        out = ((out - mean) * contrast + mean + brightness).clamp(0, 255)
    return out


def view_plan(views: int, rotate_classes: bool) -> list[tuple[int, bool]]:
    """Per cached view: (quarter turns, augmented). View 0 is always the image itself."""
    if not rotate_classes:
        return [(0, v > 0) for v in range(max(1, views))]
    return [(v % 4, v > 0) for v in range(4 * max(1, math.ceil(views / 4)))]  # all four turns, whole rounds
