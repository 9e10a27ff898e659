"""Guarded light fine-tuning: a residual linear adapter over frozen embeddings.

``f(x) = normalize(x + x W)`` with ``W = 0`` at the start (the identity), trained with a
prototypical loss on episodes drawn from classes with >= 2 training examples, a small learning
rate, weight decay towards the identity and early stopping. It is adopted only when it classifies
held-out examples better than the frozen embeddings (the negative-transfer guard); otherwise the
report says why and the frozen head stays.
"""
from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .evaluate import sample_episode
from .heads import class_index, normalize, prototype_scores


@dataclass
class AdapterReport:
    adopted: bool
    reason: str
    frozen_accuracy: float | None = None  # percent, on the held-out decision examples
    adapted_accuracy: float | None = None
    decision_examples: int = 0
    train_examples: int = 0
    classes: int = 0
    epochs: int = 0
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)  # early-stopping accuracy per epoch
    stopped: str = ""  # "early stopping", "time budget" or "epochs"

    def to_dict(self) -> dict:
        return asdict(self)


class Adapter:
    """The trained residual map; ``apply`` works on any (n, dim) unit rows."""

    def __init__(self, weight: np.ndarray) -> None:
        self.weight = np.asarray(weight, np.float32)

    @property
    def dim(self) -> int:
        return self.weight.shape[0]

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        return normalize(x + x @ self.weight)

    def to_bytes(self) -> bytes:
        """The weight as a .npy file's bytes (no pickle): what a gallery stores."""
        buffer = io.BytesIO()
        np.save(buffer, self.weight, allow_pickle=False)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Adapter":
        return cls(np.load(io.BytesIO(data), allow_pickle=False))


def split_examples(labels, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per class with >= 3 examples, hold out ``fraction`` (at least one, leaving >= 2 to train)."""
    _, index = class_index(labels)
    train, held = [], []
    for c in range(index.max() + 1):
        rows = rng.permutation(np.flatnonzero(index == c))
        n_held = min(max(1, int(round(len(rows) * fraction))), len(rows) - 2) if len(rows) >= 3 else 0
        held.extend(rows[:n_held])
        train.extend(rows[n_held:])
    return np.asarray(sorted(train), int), np.asarray(sorted(held), int)


def _accuracy(support, support_labels, queries, query_labels) -> float:
    s, names = prototype_scores(queries, support, support_labels)
    return float((np.asarray(names)[s.argmax(axis=1)] == np.asarray(query_labels)).mean() * 100)


def train_adapter(embeddings: np.ndarray, labels, *, epochs: int = 30, episodes_per_epoch: int = 20,
                  ways: int = 20, lr: float = 1e-3, weight_decay: float = 1e-3, patience: int = 4,
                  held_out: float = 0.3, time_budget_s: float = 30.0, seed: int = 0,
                  progress: bool = False) -> tuple[Adapter | None, AdapterReport]:
    """Train and judge an adapter; returns (adapter or None, report)."""
    import torch
    from tqdm import tqdm

    started = time.perf_counter()
    x = normalize(np.asarray(embeddings, np.float32))
    labels = np.asarray(labels).astype(str)
    rng = np.random.default_rng(seed)
    train, held = split_examples(labels, held_out, rng)
    names, index = class_index(labels[train])
    by_class = [train[index == c] for c in range(len(names)) if (index == c).sum() >= 2]
    if len(by_class) < 2 or len(held) < 4:
        return None, AdapterReport(False, "not enough examples to train and check an adapter: it needs at least "
                                   "2 classes with >= 3 examples each (some are held out to check it)",
                                   train_examples=len(train), classes=len(names))
    # half the held-out examples stop early, the other half decide: the decision is not tuned on
    halves = rng.permutation(len(held)) % 2
    stop, decide = (held[halves == 0], held[halves == 1]) if len(held) >= 4 else (held, held)
    torch.manual_seed(seed)
    weight = torch.zeros(x.shape[1], x.shape[1], requires_grad=True)
    optimiser = torch.optim.AdamW([weight], lr=lr, weight_decay=weight_decay)
    xt = torch.from_numpy(x)

    def accuracy_on(rows) -> float:
        with torch.no_grad():
            support, queries = _residual(xt[train], weight).numpy(), _residual(xt[rows], weight).numpy()
        return _accuracy(support, labels[train], queries, labels[rows])

    best_acc = _accuracy(x[train], labels[train], x[stop], labels[stop])
    best_weight, history, bad_epochs, stopped = weight.detach().clone(), [], 0, "epochs"
    bar = tqdm(range(1, epochs + 1), desc="adapter", unit="epoch", disable=not progress)
    for epoch in bar:
        for _ in range(episodes_per_epoch):
            loss = _episode_loss(xt, weight, _episode(by_class, ways, rng))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        history.append(accuracy_on(stop))
        bar.set_postfix(loss=f"{loss.item():.3f}", held_out=f"{history[-1]:.1f}%")
        if history[-1] > best_acc:
            best_acc, best_weight, bad_epochs = history[-1], weight.detach().clone(), 0
        else:
            bad_epochs += 1
        if bad_epochs >= patience or time.perf_counter() - started > time_budget_s:
            stopped = "early stopping" if bad_epochs >= patience else "time budget"
            break
    bar.close()
    with torch.no_grad():
        weight.copy_(best_weight)
    frozen, tuned = _accuracy(x[train], labels[train], x[decide], labels[decide]), accuracy_on(decide)
    report = AdapterReport(tuned > frozen, "", frozen, tuned, len(decide), len(train), len(names), len(history),
                           time.perf_counter() - started, history, stopped)
    if report.adopted:
        report.reason = f"adopted: held-out accuracy {tuned:.1f}% beats the frozen head's {frozen:.1f}%"
        return Adapter(best_weight.numpy()), report
    report.reason = (f"not adopted: held-out accuracy {tuned:.1f}% does not beat the frozen head's "
                     f"{frozen:.1f}% (negative-transfer guard)")
    return None, report


def _residual(x, weight):
    import torch

    return torch.nn.functional.normalize(x + x @ weight, dim=-1)


def _episode(by_class: list[np.ndarray], ways: int, rng: np.random.Generator):
    """Rows of a random episode: each chosen class's training examples split into support and query."""
    _, splits = sample_episode(by_class, ways, rng)
    return ([support for support, _ in splits], np.concatenate([query for _, query in splits]),
            np.asarray([k for k, (_, query) in enumerate(splits) for _ in query]))


def _episode_loss(xt, weight, episode):
    """Prototypical loss: cross-entropy over scaled cosines of queries to support means."""
    import torch

    support, query, target = episode
    s = _residual(xt[np.concatenate(support)], weight)
    protos = torch.stack([chunk.mean(0) for chunk in torch.split(s, [len(part) for part in support])])
    logits = 10.0 * _residual(xt[query], weight) @ torch.nn.functional.normalize(protos, dim=-1).T
    return torch.nn.functional.cross_entropy(logits, torch.from_numpy(target))
