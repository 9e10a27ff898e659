"""The frozen-feature cache: the lower units' outputs for every image and view, computed once,
within a share of physical memory."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import FewShotError
from ..runtimes import OnnxRuntime, export_onnx, make_padding_static
from .config import MAX_CACHE_FRACTION
from .views import augment


def cache_views(pixels: np.ndarray, lower, shape: tuple, plan: list[tuple[int, bool]], kind: str, seed: int,
           progress: bool):
    """(views, n, *shape) fp16 outputs of the frozen lower units (uint8 pixels -> flat features, see
    ``frozen_inference``) for the views of ``plan``; augmented views are rounded back to pixels."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    chunk, parts = 64, [[] for _ in plan]
    with tqdm(total=len(pixels) * len(plan), desc="cache frozen units", unit="img",
              disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(pixels), chunk):
            x = torch.from_numpy(pixels[start:start + chunk])
            for v, (turns, augmented) in enumerate(plan):
                view = torch.rot90(x, turns, dims=(2, 3)) if turns else x
                if augmented and kind != "none":
                    view = augment(view.float(), kind, generator).round_().to(torch.uint8)
                features = torch.from_numpy(lower(view.numpy()))
                parts[v].append(features.view(len(x), *shape).half())
                bar.update(len(x))
    return torch.stack([torch.cat(p) for p in parts])


def frozen_inference(module, device: str, size: tuple[int, int] | None = None, example=None):
    """A frozen module as a function of numpy batches: uint8 pixels of ``size`` (the usual encoder
    input) or tensors shaped like ``example``. ONNX Runtime on the CPU (1.6-4x eager PyTorch for these
    convolutions on 2 cores), PyTorch on an accelerator."""
    import tempfile

    import torch

    module = copy.deepcopy(module).float().eval()  # static padding must not touch the trained network
    if device != "cpu":
        module.to(device)

        def run(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(batch).to(device)).float().cpu().numpy()
        return run
    make_padding_static(module, size, example=example)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "frozen.onnx"
        export_onnx(module, size, path, example=example)
        return OnnxRuntime(path)  # the session holds the model: the file may go


def check_cache_size(images: int, views: int, shape: tuple) -> float:
    """Cache size in MB; raises when it would not fit comfortably in memory."""
    import os

    mb = images * views * int(np.prod(shape)) * 2 / 2**20
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        return mb
    if mb > physical * MAX_CACHE_FRACTION:
        raise FewShotError(f"caching the frozen units would take {mb:,.0f} MB of {physical:,.0f} MB memory; "
                           "use fewer --views, a smaller --image-size, or a larger --unfreeze")
    return mb
