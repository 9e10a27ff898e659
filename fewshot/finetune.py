"""Domain fine-tuning: a new head on frozen features, then the encoder's top units, guarded.

The encoder is cut into *units* (the stem, each residual block, the final conv): the lower ones
stay frozen, so their outputs for every training image (and a few augmented views of it) are
computed once and cached; each epoch then runs only the top ``unfreeze`` units. Phase 1 trains a
head on the frozen top's pooled features; phase 2 trains the top units (smaller learning rates the
deeper a unit sits) and the head, with early stopping on few-shot episodes over held-out classes.
The run ends by comparing the frozen base encoder and the fine-tuned one on *other* held-out
classes (the negative-transfer guard): ``kept`` only when fine-tuning helped, or when forced.

The output folder holds ``model.safetensors`` (the whole network, never pickle) and
``finetune.json`` (base encoder, its fingerprint, preprocessing, report); the encoder spec
``finetuned:OUT`` loads it on either runtime.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .checkpoint import FORMAT_VERSION, META_FILE, WEIGHTS_FILE, build_network
from .datasets import list_items
from .errors import FewShotError, InvalidSource, OutputConflict
from .evaluate import run_episodes
from .files import replaced_atomically, write_atomic
from .images import Preprocessing
from .runtimes import OnnxRuntime, export_onnx, make_padding_static, owned_cores, wrap_network

MAX_CACHE_FRACTION = 0.5  # of physical memory
PHASE_ONE_VIEWS = 8  # cached views (all four turns, twice) pooled for the head's phase


@dataclass
class FinetuneConfig:
    encoder: str = "efficientnet_lite0"
    unfreeze: int | str = 6  # top units trained in phase 2, or "all"
    method: str = "protonet"  # "protonet" (episodic) or "cosine" (Baseline++ over the base classes)
    epochs: int = 20
    lr: float = 1e-3  # for the head and the topmost unit; each unit below gets LAYER_DECAY times less
    layer_decay: float = 0.8
    image_size: int | None = None  # None: the encoder's own input size
    val_classes: float = 0.1  # fraction of classes held out (half stop early, half judge)
    views: int = 3  # cached views per image: the image itself and views-1 augmented copies
    augment: str = "auto"  # auto | shapes | photos | none
    rotate_classes: bool = False  # each class turned by 90/180/270 degrees is a new class (glyphs, symbols)
    ways: int = 60  # classes per training episode (Prototypical Networks trained 60-way on Omniglot)
    batchnorm: str = "train"  # "train": batch statistics; "frozen": recalibrated on the data once, then fixed
    shots: int = 1
    queries: int = 5
    batch_size: int = 128  # the cosine method's batch
    patience: int = 4
    max_minutes: float | None = None
    keep_anyway: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinetuneReport:
    kept: bool
    reason: str
    out: str
    frozen: dict = field(default_factory=dict)  # episode report of the base encoder on the judging classes
    finetuned: dict = field(default_factory=dict)
    difference: float = 0.0  # fine-tuned minus frozen accuracy, percent, paired over the same episodes
    difference_ci95: float = 0.0
    unfrozen_units: int = 0
    total_units: int = 0
    train_classes: int = 0
    stop_classes: int = 0
    judge_classes: int = 0
    images: int = 0
    unreadable: int = 0
    epochs: int = 0
    stopped: str = ""  # "early stopping", "epochs", "time budget", "interrupted"
    best_validation: float = 0.0
    history: list[dict] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- data
def _classes_split(labels: np.ndarray, val_fraction: float, rng: np.random.Generator):
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


def _decode_all(items, prep: Preprocessing, workers: int | None, progress: bool, desc: str):
    """Items -> (uint8 pixels (n, 3, H, W), kept item indices); unreadable images are skipped."""
    from .embed import PixelDecoder

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


def _augment_kind(pixels: np.ndarray, asked: str) -> str:
    if asked != "auto":
        return asked
    sample = pixels[:: max(1, len(pixels) // 256)].astype(np.int16)
    grey = np.abs(sample[:, 0] - sample[:, 1]).max() <= 2 and np.abs(sample[:, 1] - sample[:, 2]).max() <= 2
    return "shapes" if grey else "photos"  # no mirror images or colour changes for glyphs, scans, x-rays


def _augment(x, kind: str, generator):
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


def _cache(pixels: np.ndarray, lower, shape: tuple, plan: list[tuple[int, bool]], kind: str, seed: int,
           progress: bool):
    """(views, n, *shape) fp16 outputs of the frozen lower units (uint8 pixels -> flat features, see
    ``_frozen_inference``) for the views of ``plan``; augmented views are rounded back to pixels."""
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
                    view = _augment(view.float(), kind, generator).round_().to(torch.uint8)
                features = torch.from_numpy(lower(view.numpy()))
                parts[v].append(features.view(len(x), *shape).half())
                bar.update(len(x))
    return torch.stack([torch.cat(p) for p in parts])


def _frozen_inference(module, device: str, size: tuple[int, int] | None = None, example=None):
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


def _check_cache_size(images: int, views: int, shape: tuple) -> float:
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


# ---------------------------------------------------------------- training
def _episode(groups: list[tuple[np.ndarray, np.ndarray]], ways: int, shots: int, queries: int,
             rng: np.random.Generator):
    """(view, row) pairs for support and queries, and their episode class numbers. A group is a
    training class (turned by some quarter turns): its rows and the cached views that show it."""
    picked = rng.choice(len(groups), min(ways, len(groups)), replace=False)
    support, query, query_labels = [], [], []
    for k, c in enumerate(picked):
        rows, views = groups[c]
        rows = rng.permutation(rows)
        n_query = min(queries, len(rows) - shots)
        chosen = rows[: shots + n_query]
        chosen_views = rng.choice(views, size=len(chosen))
        support += list(zip(chosen_views[:shots], chosen[:shots]))
        query += list(zip(chosen_views[shots:], chosen[shots:]))
        query_labels += [k] * n_query
    return support, query, np.asarray(query_labels), len(picked)


class _Trainer:
    """Phase 1 (head on frozen pooled features) and phase 2 (top units + head) on the cache."""

    def __init__(self, network, top, cache, labels_idx: np.ndarray, train_rows: np.ndarray, n_classes: int,
                 plan: list[tuple[int, bool]], cfg: FinetuneConfig, device: str):
        import torch

        self.torch = torch
        self.network, self.top, self.cache, self.cfg, self.device = network, top, cache, cfg, device
        self.labels = labels_idx
        self.train_rows = train_rows
        self.turns = np.asarray([turns for turns, _ in plan])
        self.rotations = int(self.turns.max()) + 1
        by_class = [train_rows[labels_idx[train_rows] == c] for c in range(n_classes)]
        self.groups = [(rows, np.flatnonzero(self.turns == turns)) for rows in by_class
                       if len(rows) >= cfg.shots + 1 for turns in range(self.rotations)]
        if len(self.groups) < 2:
            raise InvalidSource(f"fine-tuning needs >= 2 training classes with >= {cfg.shots + 1} images each; "
                                f"this data has {len(self.groups)}")
        self.rng = np.random.default_rng(cfg.seed)
        self.scale = torch.nn.Parameter(torch.tensor(10.0, device=device))
        self.classifier = None
        if cfg.method == "cosine":
            dim = network.head.out_features
            self.classifier = torch.nn.Parameter(torch.randn(n_classes * self.rotations, dim, device=device) * 0.01)

    def features(self, x, trainable_top: bool):
        """Cached lower-unit outputs -> unit-length embeddings through the top units and the head."""
        import torch.nn.functional as F

        h = self.top(x) if trainable_top else x
        return F.normalize(self.network.head(self.network.pool(h).flatten(1)), dim=1)

    def loss(self, features_of):
        import torch.nn.functional as F

        torch, cfg = self.torch, self.cfg
        if cfg.method == "protonet":
            support, query, query_labels, ways = _episode(self.groups, cfg.ways, cfg.shots, cfg.queries, self.rng)
            f = features_of(support + query)
            protos = F.normalize(f[: len(support)].view(ways, cfg.shots, -1).mean(1), dim=1)
            logits = self.scale * f[len(support):] @ protos.T
            return F.cross_entropy(logits, torch.from_numpy(query_labels).to(self.device))
        views, rows = self.random_pairs(cfg.batch_size, self.rng)
        f = features_of(list(zip(views, rows)))
        logits = self.scale * f @ F.normalize(self.classifier, dim=1).T
        labels = self.labels[rows] * self.rotations + self.turns[views]
        return F.cross_entropy(logits, torch.from_numpy(labels).to(self.device))

    def random_pairs(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(views, rows) of up to ``n`` distinct training images, each in a random cached view."""
        rows = rng.choice(self.train_rows, min(n, len(self.train_rows)), replace=False)
        return rng.integers(len(self.cache), size=len(rows)), rows

    def steps_per_epoch(self) -> int:
        per_step = (self.cfg.ways * (self.cfg.shots + self.cfg.queries) if self.cfg.method == "protonet"
                    else self.cfg.batch_size)
        return max(1, math.ceil(len(self.train_rows) * self.rotations / per_step))

    def batch(self, pairs):
        return _channels_last(self.cache[_index(pairs)], self.device)

    def extra_parameters(self) -> list:
        return [self.scale] + ([self.classifier] if self.classifier is not None else [])


def _channels_last(x, device: str):
    """Cached fp16 activations -> float32 on the device, channels-last (twice as fast on CPU)."""
    import torch

    return x.float().to(device).contiguous(memory_format=torch.channels_last)


def _index(pairs: list) -> tuple:
    """(view, row) pairs -> a tensor index into a (views, rows, ...) cache."""
    import torch

    views, rows = zip(*pairs)
    return torch.as_tensor(np.asarray(views, np.int64)), torch.as_tensor(np.asarray(rows, np.int64))


def _unit_groups(top_units: list, lr: float, decay: float) -> list[dict]:
    """One parameter group per unit, the topmost at ``lr``, each lower one ``decay`` times less."""
    groups = []
    for depth, unit in enumerate(reversed(top_units)):
        groups.append({"params": list(unit.parameters()), "lr": lr * decay ** depth})
    return groups


def finetune(data: str | Path, out: str | Path, config: FinetuneConfig | None = None,
             progress: bool = True, log=print) -> FinetuneReport:
    """Fine-tune ``config.encoder`` on the labelled images under ``data``; write the result to ``out``."""
    import torch

    from .backbones import parse_spec
    from .encoders import create_encoder, resolve_device_runtime

    cfg = config or FinetuneConfig()
    if cfg.method not in ("protonet", "cosine"):
        raise FewShotError(f"unknown method {cfg.method!r}; choose protonet or cosine")
    if cfg.ways < 2:
        raise FewShotError(f"--ways must be >= 2, got {cfg.ways}")
    started = time.perf_counter()
    seconds: dict = {}
    out = Path(out)
    _check_out(out)
    device, _ = resolve_device_runtime(cfg.device, "torch")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    items = [item for item in list_items(data) if item.label]
    if not items:
        raise InvalidSource(f"{data} has no labelled images: fine-tuning needs DATA/<class>/<image> folders")
    base = create_encoder(cfg.encoder, device="cpu", runtime="torch")
    source = parse_spec(cfg.encoder)
    trunk, base_prep = source.build(source)
    prep = _sized(base_prep, cfg.image_size)
    head_dim = _output_dim(trunk, prep)
    network = build_network(trunk, head_dim).to(device, memory_format=torch.channels_last)
    units = list(network.body)
    k = len(units) if cfg.unfreeze == "all" else int(cfg.unfreeze)
    if not 0 <= k <= len(units):
        raise FewShotError(f"--unfreeze must be 0..{len(units)} or all for {cfg.encoder} ({len(units)} units)")
    pixels, kept = _decode_all(items, prep, cfg.workers, progress, "decode")
    unreadable = len(items) - len(kept)
    items = [items[i] for i in kept]
    labels = np.asarray([item.label for item in items])
    train, stop, judge = _classes_split(labels, cfg.val_classes, rng)
    train_names = sorted(train)
    class_of = {name: i for i, name in enumerate(train_names)}
    labels_idx = np.asarray([class_of.get(name, -1) for name in labels])
    train_rows = np.flatnonzero(labels_idx >= 0)
    stop_rows = np.flatnonzero(np.isin(labels, sorted(stop)))
    judge_rows = np.flatnonzero(np.isin(labels, sorted(judge)))
    seconds["decode"] = time.perf_counter() - started

    lower, top = torch.nn.Sequential(*units[: len(units) - k]).eval(), torch.nn.Sequential(*units[len(units) - k:])
    for p in network.parameters():
        p.requires_grad_(False)
    lower_pixels = wrap_network(lower, prep.mean, prep.std)
    kind = _augment_kind(pixels, cfg.augment)
    plan = view_plan(cfg.views, cfg.rotate_classes)
    with torch.no_grad():
        shape = tuple(lower_pixels.trunk(torch.zeros(1, 3, *prep.size)).shape[1:])
    cache_mb = _check_cache_size(len(pixels), len(plan), shape)
    log(f"{len(items)} images, {len(train)} training classes, {len(stop)} + {len(judge)} held out; "
        f"{len(units)} units, top {k} trained; {len(plan)} view(s) per image ({kind} augmentation"
        f"{', classes turned by quarter turns are new classes' if cfg.rotate_classes else ''}) cached at "
        f"{prep.size[0]}x{prep.size[1]} px: {cache_mb:,.0f} MB")
    t = time.perf_counter()
    cache = _cache(pixels, _frozen_inference(lower_pixels, device, prep.size), shape, plan, kind, cfg.seed, progress)
    seconds["cache"] = time.perf_counter() - t
    judge_pixels = pixels[judge_rows]
    del pixels

    trainer = _Trainer(network, top, cache, labels_idx, train_rows, len(train_names), plan, cfg, device)

    def checkpoint() -> None:  # the best so far, not usable until judged: Ctrl-C twice still leaves it
        unjudged = FinetuneReport(False, "interrupted before the guard judged it", str(out))
        _save(out, network, prep, head_dim, base, cfg, unjudged)

    validate = _validator(trainer, cache, stop_rows, labels, cfg.seed)
    history: list[dict] = []
    stopped = "epochs"
    deadline = started + cfg.max_minutes * 60 if cfg.max_minutes else None
    best = {"accuracy": validate(), "state": copy.deepcopy(network.state_dict()), "epoch": 0}
    log(f"held-out accuracy before training: {best['accuracy']:.2f}%")
    t = time.perf_counter()
    try:
        _phase_one(trainer, top, cache, cfg, progress, device)
        accuracy = validate()
        history.append({"epoch": 0, "phase": "head", "validation": accuracy})
        if accuracy > best["accuracy"]:
            best = {"accuracy": accuracy, "state": copy.deepcopy(network.state_dict()), "epoch": 0}
        for p in top.parameters():
            p.requires_grad_(True)
        stopped = _phase_two(trainer, network, top, cfg, best, history, validate, checkpoint, progress, deadline, log)
    except KeyboardInterrupt:
        stopped = "interrupted"
        log("interrupted: keeping the best checkpoint so far and judging it")
    seconds["train"] = time.perf_counter() - t
    network.load_state_dict(best["state"])
    network.eval()

    t = time.perf_counter()
    report = _judge(base, network, prep, judge_pixels, items, judge_rows, cfg, device, progress)
    seconds["judge"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    report.update(out=str(out), unfrozen_units=k, total_units=len(units), train_classes=len(train),
                  stop_classes=len(stop), judge_classes=len(judge), images=len(items),
                  unreadable=unreadable, epochs=len(history) - 1, stopped=stopped,
                  best_validation=best["accuracy"], history=history, seconds=seconds)
    result = FinetuneReport(**report)
    if not result.kept and cfg.keep_anyway:
        result.kept, result.reason = True, result.reason + "; kept anyway (--keep-anyway)"
    _save(out, network, prep, head_dim, base, cfg, result)
    return result


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / META_FILE).is_file())):
        raise OutputConflict(f"{out} exists and is not a fine-tuning output; choose an empty or new OUT")


def _sized(prep: Preprocessing, size: int | None) -> Preprocessing:
    if not size:
        return prep
    if not 32 <= size <= 1024:
        raise FewShotError(f"--image-size must be 32..1024 pixels, got {size}")
    ratio = prep.resize / min(prep.size)
    return Preprocessing((size, size), int(round(size * ratio)), prep.interpolation, prep.mean, prep.std,
                         prep.resize_mode)


def _output_dim(trunk, prep: Preprocessing) -> int:
    import torch

    with torch.no_grad():
        return int(trunk.eval()(torch.zeros(1, 3, *prep.size)).flatten(1).shape[1])


def _validator(trainer: _Trainer, cache, rows: np.ndarray, labels: np.ndarray, seed: int):
    """Accuracy of N-way 1-shot episodes over the stop classes' plain views, in the current weights."""
    import torch

    names = labels[rows]
    ways, queries = _episode_shape(names, max_queries=5)

    def validate() -> float:
        trainer.top.eval()
        trainer.network.head.eval()
        with torch.no_grad():
            f = torch.cat([trainer.features(_channels_last(cache[0, rows[i:i + 256]], trainer.device), True).cpu()
                           for i in range(0, len(rows), 256)]).numpy()
        return run_episodes(f, names, ways, 1, queries, episodes=200, seed=seed).accuracy

    return validate


def _phase_one(trainer: _Trainer, top, cache, cfg: FinetuneConfig, progress: bool, device: str) -> None:
    """Train the head (and the cosine classifier) on the frozen top's pooled features."""
    import torch

    pooled_views = min(len(cache), PHASE_ONE_VIEWS)  # a multiple of 4: view v stands for view v % pooled_views
    frozen_top = _frozen_inference(torch.nn.Sequential(top, trainer.network.pool), device,
                                   example=cache[0, :2].float())
    pooled = torch.zeros(pooled_views, cache.shape[1], trainer.network.head.in_features)
    with tqdm(total=pooled_views * cache.shape[1], desc="phase 1: pool", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for v in range(pooled_views):
            for i in range(0, cache.shape[1], 256):
                batch = cache[v, i:i + 256].float().numpy()
                pooled[v, i:i + len(batch)] = torch.from_numpy(frozen_top(batch).reshape(len(batch), -1))
                bar.update(len(batch))
    trainer.network.head.train()
    for p in trainer.network.head.parameters():
        p.requires_grad_(True)
    params = list(trainer.network.head.parameters()) + trainer.extra_parameters()
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    steps = trainer.steps_per_epoch() * (3 if cfg.method == "cosine" else 1)

    def features_of(pairs):
        views, rows = _index(pairs)
        return torch.nn.functional.normalize(trainer.network.head(pooled[views % pooled_views, rows].to(device)), dim=1)

    bar = tqdm(range(steps), desc="phase 1: head", unit="step", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        loss = trainer.loss(features_of)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")


def _phase_two(trainer: _Trainer, network, top, cfg: FinetuneConfig, best: dict, history: list, validate,
               checkpoint, progress: bool, deadline: float | None, log) -> str:
    """Train the top units and the head; early stopping on the stop classes; checkpoint the best."""
    import torch

    units = list(top)
    if not units:
        return "nothing to unfreeze"
    if cfg.batchnorm == "frozen":
        _recalibrate_batchnorm(trainer, top)
    groups = _unit_groups(units, cfg.lr, cfg.layer_decay)
    groups.append({"params": list(network.head.parameters()) + trainer.extra_parameters(), "lr": cfg.lr})
    optimiser = torch.optim.AdamW(groups, weight_decay=1e-4)
    steps = trainer.steps_per_epoch()
    horizon = [cfg.epochs * steps]  # cosine decay over the epochs that will run (fewer under a time budget)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, step / horizon[0]))))
    bad_epochs = 0
    for epoch in range(1, cfg.epochs + 1):
        epoch_started = time.perf_counter()
        top.train()
        if cfg.batchnorm == "frozen":
            for norm in batchnorm_modules(top):
                norm.eval()
        network.head.train()
        bar = tqdm(range(steps), desc=f"phase 2: epoch {epoch}/{cfg.epochs}", unit="step",
                   disable=not progress, dynamic_ncols=True)
        total = 0.0
        for step in bar:
            loss = trainer.loss(lambda pairs: trainer.features(trainer.batch(pairs), True))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item()
            bar.set_postfix(loss=f"{total / (step + 1):.3f}", best=f"{best['accuracy']:.1f}%")
            if deadline and time.perf_counter() > deadline:
                break
        accuracy = validate()
        if deadline and epoch == 1:
            fit = epoch + int((deadline - time.perf_counter()) // (time.perf_counter() - epoch_started))
            horizon[0] = max(1, min(cfg.epochs, fit)) * steps
        history.append({"epoch": epoch, "phase": "top", "loss": total / (step + 1), "validation": accuracy})
        log(f"epoch {epoch}: loss {total / (step + 1):.3f}, held-out 1-shot accuracy {accuracy:.2f}% "
                  f"(best {max(accuracy, best['accuracy']):.2f}%)")
        if accuracy > best["accuracy"]:
            best.update(accuracy=accuracy, state=copy.deepcopy(network.state_dict()), epoch=epoch)
            checkpoint()
            bad_epochs = 0
        else:
            bad_epochs += 1
        if deadline and time.perf_counter() > deadline:
            return "time budget"
        if bad_epochs >= cfg.patience:
            return "early stopping"
    return "epochs"


def batchnorm_modules(module) -> list:
    """The BatchNorm layers inside ``module``, in order."""
    import torch.nn as nn

    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _recalibrate_batchnorm(trainer: _Trainer, top, batches: int = 16, size: int = 256) -> None:
    """Re-estimate the top units' BatchNorm statistics on training views (the pre-trained ones describe
    another domain), to be held fixed while training: a step then costs less than in batch-statistics mode."""
    import torch

    norms = batchnorm_modules(top)
    saved = [m.momentum for m in norms]
    for m in norms:
        m.train()
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    rng = np.random.default_rng(trainer.cfg.seed)
    with torch.no_grad():
        for _ in range(batches):
            top(trainer.batch(list(zip(*trainer.random_pairs(size, rng)))))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    top.eval()


def _judge(base, network, prep: Preprocessing, judge_pixels: np.ndarray, items, judge_rows: np.ndarray,
           cfg: FinetuneConfig, device: str, progress: bool) -> dict:
    """Frozen base encoder vs fine-tuned network on the judging classes, over the same episodes."""
    names = np.asarray([items[i].label for i in judge_rows])
    frozen_pixels, _ = _decode_all([items[i] for i in judge_rows], base.preprocessing, cfg.workers, False, "")
    frozen = np.concatenate([base.embed(frozen_pixels[i:i + 64]) for i in range(0, len(frozen_pixels), 64)])
    run = _frozen_inference(wrap_network(network, prep.mean, prep.std), device, prep.size)
    tuned = np.concatenate([run(judge_pixels[i:i + 128]) for i in range(0, len(judge_pixels), 128)])
    return guard(frozen, tuned, names, cfg.seed + 1, frozen_name=base.spec)


def _episode_shape(names: np.ndarray, max_queries: int) -> tuple[int, int]:
    """(ways, queries) of 1-shot episodes over held-out classes with >= 2 images (at most 20-way)."""
    counts = np.unique(names, return_counts=True)[1]
    usable = counts[counts >= 2]
    if len(usable) < 2:
        raise InvalidSource("the held-out classes need >= 2 images each to judge fine-tuning by 1-shot episodes; "
                            "give classes more images or raise --val-classes")
    return min(20, len(usable)), int(min(max_queries, usable.min() - 1))


def guard(frozen: np.ndarray, tuned: np.ndarray, labels, seed: int = 1, frozen_name: str = "frozen") -> dict:
    """The negative-transfer guard: the same 1-shot episodes over held-out images embedded both ways.

    Kept only when the accuracy difference is positive beyond its 95% interval. The interval is
    over *classes* (each class's query accuracy, paired), not episodes: episodes re-draw the same
    few classes, and what must generalise is the next class.
    """
    names = np.asarray(labels).astype(str)
    ways, queries = _episode_shape(names, max_queries=15)
    episodes = dict(ways=ways, shots=1, queries=queries, episodes=600, seed=seed)
    a = run_episodes(frozen, names, **episodes)
    b = run_episodes(tuned, names, **episodes)
    classes = sorted(set(a.class_accuracies) & set(b.class_accuracies))
    diff = np.asarray([b.class_accuracies[c] - a.class_accuracies[c] for c in classes])
    mean = float(np.mean(np.asarray(b.episode_accuracies) - np.asarray(a.episode_accuracies)))
    ci = float(_t95(len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("inf")
    helped = mean - ci > 0
    reason = (f"fine-tuning {'helped' if helped else 'did not help'}: {ways}-way 1-shot on {len(classes)} "
              f"held-out classes, frozen {a.accuracy:.2f}% +- {a.ci95:.2f} vs fine-tuned {b.accuracy:.2f}% +- "
              f"{b.ci95:.2f} (difference {mean:+.2f} +- {ci:.2f}, 95% CI over classes)")
    return {"kept": helped, "reason": reason, "frozen": {**a.to_dict(), "encoder": frozen_name},
            "finetuned": b.to_dict(), "difference": mean, "difference_ci95": ci}


_T95 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11,
        2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04]


def _t95(df: int) -> float:
    """Two-sided 95% quantile of Student's t (few held-out classes widen the interval)."""
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.96


def _save(out: Path, network, prep: Preprocessing, head_dim: int, base, cfg: FinetuneConfig,
          report: FinetuneReport) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()}
    with replaced_atomically(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    meta = {"format": FORMAT_VERSION, "kept": report.kept, "head_dim": head_dim,
            "base": {"spec": base.spec, "fingerprint": base.fingerprint},
            "preprocessing": prep.to_dict(), "config": cfg.to_dict(), "report": report.to_dict()}
    write_atomic(out / META_FILE, json.dumps(meta, indent=1))
