"""N-way K-shot episodes over embedded data: accuracy with a 95% interval, and open-set AUROC."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

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
    for _ in range(episodes):
        classes = rng.choice(eligible, ways, replace=False)
        support, support_labels, query, query_labels = [], [], [], []
        for c in classes:
            rows = rng.permutation(by_class[c])[: shots + queries]
            support.append(rows[:shots]), query.append(rows[shots:])
            support_labels += [c] * shots
            query_labels += [c] * queries
        support, query = np.concatenate(support), np.concatenate(query)
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
