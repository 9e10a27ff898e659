"""``finetune()``: one run from a folder of labelled images to a judged, saved encoder."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np

from ..checkpoint import META_FILE, build_network, save_finetuned
from ..datasets import list_items
from ..errors import FewShotError, InvalidSource, OutputConflict
from ..evaluate import guard
from ..images import Preprocessing
from ..runtimes import wrap_network
from .cache import cache_views, check_cache_size, frozen_inference
from .config import FinetuneConfig, FinetuneReport
from .training import Trainer, phase_one, phase_two, validator
from .views import augment_kind, classes_split, decode_all, view_plan


def finetune(data: str | Path, out: str | Path, config: FinetuneConfig | None = None,
             progress: bool = True, log=print) -> FinetuneReport:
    """Fine-tune ``config.encoder`` on the labelled images under ``data``; write the result to ``out``."""
    import torch

    from ..backbones import parse_spec
    from ..encoders import create_encoder, resolve_device_runtime

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
    pixels, kept = decode_all(items, prep, cfg.workers, progress, "decode")
    unreadable = len(items) - len(kept)
    items = [items[i] for i in kept]
    labels = np.asarray([item.label for item in items])
    train, stop, judge = classes_split(labels, cfg.val_classes, rng)
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
    kind = augment_kind(pixels, cfg.augment)
    plan = view_plan(cfg.views, cfg.rotate_classes)
    with torch.no_grad():
        shape = tuple(lower_pixels.trunk(torch.zeros(1, 3, *prep.size)).shape[1:])
    cache_mb = check_cache_size(len(pixels), len(plan), shape)
    log(f"{len(items)} images, {len(train)} training classes, {len(stop)} + {len(judge)} held out; "
        f"{len(units)} units, top {k} trained; {len(plan)} view(s) per image ({kind} augmentation"
        f"{', classes turned by quarter turns are new classes' if cfg.rotate_classes else ''}) cached at "
        f"{prep.size[0]}x{prep.size[1]} px: {cache_mb:,.0f} MB")
    t = time.perf_counter()
    cache = cache_views(pixels, frozen_inference(lower_pixels, device, prep.size), shape, plan, kind, cfg.seed, progress)
    seconds["cache"] = time.perf_counter() - t
    judge_pixels = pixels[judge_rows]
    del pixels

    trainer = Trainer(network, top, cache, labels_idx, train_rows, len(train_names), plan, cfg, device)

    def checkpoint() -> None:  # the best so far, not usable until judged: Ctrl-C twice still leaves it
        unjudged = FinetuneReport(False, "interrupted before the guard judged it", str(out))
        save_finetuned(out, network, prep, head_dim, base, cfg, unjudged)

    validate = validator(trainer, cache, stop_rows, labels, cfg.seed)
    history: list[dict] = []
    stopped = "epochs"
    deadline = started + cfg.max_minutes * 60 if cfg.max_minutes else None
    best = {"accuracy": validate(), "state": copy.deepcopy(network.state_dict()), "epoch": 0}
    log(f"held-out accuracy before training: {best['accuracy']:.2f}%")
    t = time.perf_counter()
    try:
        phase_one(trainer, top, cache, cfg, progress, device)
        accuracy = validate()
        history.append({"epoch": 0, "phase": "head", "validation": accuracy})
        if accuracy > best["accuracy"]:
            best = {"accuracy": accuracy, "state": copy.deepcopy(network.state_dict()), "epoch": 0}
        for p in top.parameters():
            p.requires_grad_(True)
        stopped = phase_two(trainer, network, top, cfg, best, history, validate, checkpoint, progress, deadline, log)
    except KeyboardInterrupt:
        stopped = "interrupted"
        log("interrupted: keeping the best checkpoint so far and judging it")
    seconds["train"] = time.perf_counter() - t
    network.load_state_dict(best["state"])
    network.eval()

    t = time.perf_counter()
    report = judged(base, network, prep, judge_pixels, items, judge_rows, cfg, device, progress)
    seconds["judge"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    report.update(out=str(out), unfrozen_units=k, total_units=len(units), train_classes=len(train),
                  stop_classes=len(stop), judge_classes=len(judge), images=len(items),
                  unreadable=unreadable, epochs=len(history) - 1, stopped=stopped,
                  best_validation=best["accuracy"], history=history, seconds=seconds)
    result = FinetuneReport(**report)
    if not result.kept and cfg.keep_anyway:
        result.kept, result.reason = True, result.reason + "; kept anyway (--keep-anyway)"
    save_finetuned(out, network, prep, head_dim, base, cfg, result)
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


def judged(base, network, prep: Preprocessing, judge_pixels: np.ndarray, items, judge_rows: np.ndarray,
           cfg: FinetuneConfig, device: str, progress: bool) -> dict:
    """Frozen base encoder vs fine-tuned network on the judging classes, over the same episodes."""
    names = np.asarray([items[i].label for i in judge_rows])
    frozen_pixels, _ = decode_all([items[i] for i in judge_rows], base.preprocessing, cfg.workers, False, "")
    frozen = np.concatenate([base.embed(frozen_pixels[i:i + 64]) for i in range(0, len(frozen_pixels), 64)])
    run = frozen_inference(wrap_network(network, prep.mean, prep.std), device, prep.size)
    tuned = np.concatenate([run(judge_pixels[i:i + 128]) for i in range(0, len(judge_pixels), 128)])
    return guard(frozen, tuned, names, cfg.seed + 1, frozen_name=base.spec)
