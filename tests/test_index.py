"""The derived index: the fp16 pre-scan + fp32 re-score gives exactly the fp32 answer."""
from __future__ import annotations

import numpy as np
import pytest

from fewshot.index import PRESCAN_FROM, VectorIndex


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(PRESCAN_FROM + 5000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.normal(size=(40, 32)).astype(np.float32)
    return x, q / np.linalg.norm(q, axis=1, keepdims=True)


def test_single_queries_use_the_prescan_and_match_numpy(data):
    x, queries = data
    index = VectorIndex(32)
    index.add(x, np.arange(len(x)) + 100)
    for q in queries:
        scores, ids = index.search(q[None], 10)
        exact = x @ q
        expected = np.argsort(-exact)[:10] + 100
        np.testing.assert_array_equal(ids[0], expected)
        np.testing.assert_allclose(scores[0], np.sort(exact)[::-1][:10], atol=1e-6)


def test_batches_and_removals_stay_exact(data):
    x, queries = data
    index = VectorIndex(32)
    index.add(x, np.arange(len(x)))
    gone = np.argsort(-(x @ queries[0]))[:3]  # remove the three best answers to query 0
    index.remove(gone)
    _, single = index.search(queries[:1], 5)
    _, batch = index.search(queries, 5)
    assert not set(gone) & set(single[0].tolist())
    np.testing.assert_array_equal(single[0], batch[0])
    assert len(index) == len(x) - 3


def test_save_and_load_rebuild_the_prescan(tmp_path, data):
    x, queries = data
    index = VectorIndex(32)
    index.add(x, np.arange(len(x)))
    index.save(tmp_path / "i.faiss")
    loaded = VectorIndex.load(tmp_path / "i.faiss", 32, "exact")
    np.testing.assert_array_equal(loaded.search(queries[:1], 10)[1], index.search(queries[:1], 10)[1])
