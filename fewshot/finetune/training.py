"""Training on the cache: phase 1 (a head on frozen pooled features), phase 2 (the top units and
the head, early-stopped on held-out episodes), and the batch-norm recalibration after it."""
from __future__ import annotations

import copy
import math
import time

import numpy as np
from tqdm import tqdm

from ..errors import InvalidSource
from ..evaluate import episode_shape, run_episodes, sample_episode
from .cache import frozen_inference
from .config import PHASE_ONE_VIEWS, FinetuneConfig


# ---------------------------------------------------------------- training
def _episode(groups: list[tuple[np.ndarray, np.ndarray]], ways: int, shots: int, queries: int,
             rng: np.random.Generator):
    """(view, row) pairs for support and queries, and their episode class numbers. A group is a
    training class (turned by some quarter turns): its rows and the cached views that show it."""
    views_of = {}

    def views(group: int, chosen: np.ndarray) -> None:  # each image of the episode in one of its views
        views_of[group] = rng.choice(groups[group][1], size=len(chosen))

    picked, splits = sample_episode([rows for rows, _ in groups], ways, rng, shots, queries, each=views)
    support, query, query_labels = [], [], []
    for k, (c, (s, q)) in enumerate(zip(picked, splits)):
        chosen_views = views_of[int(c)]
        support += list(zip(chosen_views[:shots], s))
        query += list(zip(chosen_views[shots:], q))
        query_labels += [k] * len(q)
    return support, query, np.asarray(query_labels), len(picked)


class Trainer:
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


def validator(trainer: Trainer, cache, rows: np.ndarray, labels: np.ndarray, seed: int):
    """Accuracy of N-way 1-shot episodes over the stop classes' plain views, in the current weights."""
    import torch

    names = labels[rows]
    ways, queries = episode_shape(names, max_queries=5)

    def validate() -> float:
        trainer.top.eval()
        trainer.network.head.eval()
        with torch.no_grad():
            f = torch.cat([trainer.features(_channels_last(cache[0, rows[i:i + 256]], trainer.device), True).cpu()
                           for i in range(0, len(rows), 256)]).numpy()
        return run_episodes(f, names, ways, 1, queries, episodes=200, seed=seed).accuracy

    return validate


def phase_one(trainer: Trainer, top, cache, cfg: FinetuneConfig, progress: bool, device: str) -> None:
    """Train the head (and the cosine classifier) on the frozen top's pooled features."""
    import torch

    pooled_views = min(len(cache), PHASE_ONE_VIEWS)  # a multiple of 4: view v stands for view v % pooled_views
    frozen_top = frozen_inference(torch.nn.Sequential(top, trainer.network.pool), device,
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


def phase_two(trainer: Trainer, network, top, cfg: FinetuneConfig, best: dict, history: list, validate,
               checkpoint, progress: bool, deadline: float | None, log) -> str:
    """Train the top units and the head; early stopping on the stop classes; checkpoint the best."""
    import torch

    units = list(top)
    if not units:
        return "nothing to unfreeze"
    if cfg.batchnorm == "frozen":
        recalibrate_batchnorm(trainer, top)
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


def recalibrate_batchnorm(trainer: Trainer, top, batches: int = 16, size: int = 256) -> None:
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
