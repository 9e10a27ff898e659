"""N-way K-shot episodes over embedded data: accuracy with a 95% interval, and open-set AUROC."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from .errors import InvalidSource
from .heads import center, scores


@dataclass
class EpisodeReport:
    accuracy: float  # percent
    ci95: float  # percent, half-width of the 95% interval
    auroc: float | None  # known-vs-unknown, from held-out classes; None when no class is left over
    ways: int
    shots: int
    queries: int
    episodes: int
    head: str
    centered: bool
    episode_accuracies: list[float] = field(default_factory=list, repr=False)  # percent, per episode, in order
    class_accuracies: dict[str, float] = field(default_factory=dict, repr=False)  # percent, per query class

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("episode_accuracies", "class_accuracies")}


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability a random positive outscores a random negative (ties count half)."""
    both = np.concatenate([positive, negative])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # average rank within ties
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def sample_episode(groups: Sequence[np.ndarray], ways: int, rng: np.random.Generator, shots: int | None = None,
                   queries: int | None = None, each: Callable[[int, np.ndarray], None] | None = None):
    """One episode: up to ``ways`` of ``groups`` (each an array of rows), and each one's rows shuffled
    and split into (support, query): ``shots`` support rows (None: half the group's rows, at least
    one) and up to ``queries`` query rows (None: all the rest). ``each(group, chosen rows)`` is called
    per group as it is drawn (to draw more per group from the same ``rng``, in the same order).
    Returns (the picked group numbers, [(support, query)] in that order)."""
    picked = rng.choice(len(groups), min(ways, len(groups)), replace=False)
    splits = []
    for c in picked:
        rows = rng.permutation(groups[c])
        cut = shots if shots is not None else max(1, len(rows) // 2)
        end = len(rows) if queries is None else cut + min(queries, len(rows) - cut)
        if each is not None:
            each(int(c), rows[:end])
        splits.append((rows[:cut], rows[cut:end]))
    return picked, splits


def run_episodes(embeddings: np.ndarray, labels, ways: int, shots: int, queries: int = 15,
                 episodes: int = 600, head: str = "prototype", center_mean: np.ndarray | None = None,
                 seed: int = 0, **options) -> EpisodeReport:
    """Sample episodes from classes with >= shots + queries examples; score with ``head``.

    Each episode also draws one query per class from up to ``ways`` classes outside the episode
    as unknowns, for the open-set AUROC of the best-class score.
    """
    x = center(np.asarray(embeddings, np.float32), center_mean)
    labels = np.asarray(labels).astype(str)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    eligible = sorted(c for c, rows in by_class.items() if len(rows) >= shots + queries)
    if len(eligible) < ways:
        raise ValueError(f"{ways}-way {shots}-shot with {queries} queries needs {ways} classes with >= "
                         f"{shots + queries} examples; this data has {len(eligible)}")
    rng = np.random.default_rng(seed)
    accuracies, known, unknown = [], [], []
    right, asked = {c: 0 for c in eligible}, {c: 0 for c in eligible}
    groups = [by_class[c] for c in eligible]
    for _ in range(episodes):
        picked, splits = sample_episode(groups, ways, rng, shots, queries)
        classes = [eligible[c] for c in picked]
        support = np.concatenate([s for s, _ in splits])
        query = np.concatenate([q for _, q in splits])
        support_labels = [c for c in classes for _ in range(shots)]
        query_labels = [c for c in classes for _ in range(queries)]
        class_scores, names = scores(head, x[query], x[support], support_labels, **options)
        predicted = np.asarray(names)[class_scores.argmax(axis=1)]
        correct = predicted == np.asarray(query_labels)
        accuracies.append(float(correct.mean()))
        for label, ok in zip(query_labels, correct):
            right[label] += int(ok)
            asked[label] += 1
        outside = [c for c in by_class if c not in set(classes)]
        if outside:
            picks = rng.choice(outside, min(ways, len(outside)), replace=False)
            strangers = np.array([rng.choice(by_class[c]) for c in picks])
            known.append(class_scores.max(axis=1))
            unknown.append(scores(head, x[strangers], x[support], support_labels, **options)[0].max(axis=1))
    acc = np.asarray(accuracies) * 100
    return EpisodeReport(float(acc.mean()), float(1.96 * acc.std(ddof=1) / np.sqrt(len(acc))) if len(acc) > 1 else 0.0,
                         auroc(np.concatenate(known), np.concatenate(unknown)) if known else None,
                         ways, shots, queries, episodes, head, center_mean is not None, acc.tolist(),
                         {c: 100.0 * right[c] / asked[c] for c in eligible if asked[c]})


def omniglot_runs_error(embeddings: np.ndarray, paths: list[str], runs: list[list[tuple[str, str]]],
                        head: str = "prototype", center_mean: np.ndarray | None = None, **options) -> float:
    """Error rate (percent) over Omniglot's official 20-way 1-shot runs, from embedded run images.

    ``paths`` are the manifest paths (``...all_runs.zip!runNN/...``); ``runs`` from
    ``datasets.omniglot_runs``.
    """
    x = center(np.asarray(embeddings, np.float32), center_mean)
    row_of = {p.rsplit("!", 1)[-1]: i for i, p in enumerate(paths)}
    missing = [name for run in runs for pair in run for name in pair if name not in row_of]
    if missing:
        raise ValueError(f"{len(missing)} run images are not in the embeddings (e.g. {missing[0]}); "
                         "embed all_runs.zip itself")
    wrong = total = 0
    for run in runs:
        training = sorted({answer for _, answer in run})
        support = x[[row_of[name] for name in training]]
        queries = x[[row_of[test] for test, _ in run]]
        class_scores, names = scores(head, queries, support, training, **options)
        predicted = np.asarray(names)[class_scores.argmax(axis=1)]
        wrong += int((predicted != np.asarray([answer for _, answer in run])).sum())
        total += len(run)
    return 100.0 * wrong / total


def episode_shape(names: np.ndarray, max_queries: int) -> tuple[int, int]:
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
    ways, queries = episode_shape(names, max_queries=15)
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
