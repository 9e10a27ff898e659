"""The guarded adapter: starts as the identity, adopted only when held-out accuracy improves."""
from __future__ import annotations

import numpy as np

from fewshot.adapt import Adapter, split_examples, train_adapter


def warped_clusters(seed=0, n_classes=12, per_class=12, dim=24):
    """Classes that differ along a few axes buried under large shared nuisance directions:
    a linear map that learns to ignore the nuisance helps, so the adapter should be adopted."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((n_classes, dim))
    centres[:, :4] = rng.normal(size=(n_classes, 4))
    x = np.repeat(centres, per_class, axis=0)
    x[:, 4:] += 2.5 * rng.normal(size=(len(x), dim - 4))
    x[:, :4] += 0.3 * rng.normal(size=(len(x), 4))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat([f"c{i}" for i in range(n_classes)], per_class)


def test_identity_at_start():
    x, _ = warped_clusters()
    np.testing.assert_allclose(Adapter(np.zeros((x.shape[1],) * 2)).apply(x), x, atol=1e-6)


def test_split_keeps_two_training_examples_per_class():
    labels = ["a"] * 2 + ["b"] * 3 + ["c"] * 10
    train, held = split_examples(labels, 0.3, np.random.default_rng(0))
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(15))
    assert [np.asarray(labels)[train].tolist().count(c) for c in "abc"] == [2, 2, 7]


def test_adapter_adopted_when_it_helps(tmp_path):
    x, labels = warped_clusters()
    adapter, report = train_adapter(x, labels, ways=8, lr=1e-2, epochs=40, seed=0)
    assert report.adopted and adapter is not None, report.reason
    assert report.adapted_accuracy > report.frozen_accuracy and "adopted" in report.reason
    np.testing.assert_array_equal(Adapter.from_bytes(adapter.to_bytes()).apply(x[:3]), adapter.apply(x[:3]))


def test_guard_refuses_an_adapter_that_cannot_beat_the_frozen_head():
    """Well-separated classes: the frozen head is already perfect on held-out examples, so no
    adapter can beat it and the guard keeps the frozen head."""
    rng = np.random.default_rng(1)
    centres = np.eye(10, 16) * 5
    x = np.repeat(centres, 12, axis=0) + 0.05 * rng.normal(size=(120, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    adapter, report = train_adapter(x, np.repeat([f"c{i}" for i in range(10)], 12), ways=5, seed=1)
    assert adapter is None and not report.adopted
    assert report.frozen_accuracy == 100.0 and "negative-transfer guard" in report.reason


def test_too_few_examples_is_explained():
    adapter, report = train_adapter(np.eye(4, dtype=np.float32), ["a", "b", "c", "d"])
    assert adapter is None and not report.adopted and "at least" in report.reason
