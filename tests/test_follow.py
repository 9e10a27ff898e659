"""Two handles on one gallery (two processes: a server and `fewshot gallery import`, or two replicas):
what one commits, the other's index, labels and prototypes show (SQLite: on its next read;
PostgreSQL: once the notice arrives, well within a second), equal to a fresh open of the database,
through every kind of change and after the change log was pruned. Both stores."""
from __future__ import annotations

import time

import numpy as np
import pytest

from fewshot import gallery as gallery_module
from fewshot.gallery import GalleryStore

DIM = 8


def unit(rng, n):
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def state(g):
    """What a reader sees: version, every (id, label), prototypes and a search, compared exactly."""
    vectors, ids, labels = g.vectors()
    order = np.argsort(ids)
    found = g.lookup(unit(np.random.default_rng(9), 3), neighbours=5) if len(g) else None
    return (g.version, [(int(ids[i]), labels[i]) for i in order], np.round(vectors[order], 6).tolist(),
            None if found is None else (found.names, np.round(found.proto_scores, 5).tolist(),
                                        np.round(found.sims, 5).tolist()))


def followed(follower, writer):
    """The follower's state once it shows the writer's version (SQLite: at once; PostgreSQL: the
    notice is on its way), which must then equal the writer's."""
    deadline = time.monotonic() + 2
    while follower.version != writer.version and time.monotonic() < deadline:
        time.sleep(0.005)
    return state(follower)


@pytest.fixture
def pair(location):
    a, b = GalleryStore(location), GalleryStore(location)
    writer = a.get("g", DIM, "fp", "test", create=True)
    writer.add("x", unit(np.random.default_rng(0), 2))
    follower = b.get("g")
    yield writer, follower, location
    a.close()
    b.close()


def fresh(root):
    store = GalleryStore(root)
    try:
        return state(store.get("g"))
    finally:
        store.close()


def test_follower_sees_every_kind_of_change(pair):
    writer, follower, root = pair
    rng = np.random.default_rng(1)
    assert followed(follower, writer) == state(writer)
    steps = [
        lambda: writer.add("y", unit(rng, 3)),
        lambda: writer.add("x", unit(rng, 2)),
        lambda: writer.relabel_example(writer.get_class("y").ids[0], "z"),
        lambda: writer.remove_example(writer.get_class("x").ids[0]),
        lambda: writer.rename_class("y", "w"),
        lambda: writer.remove_class("z"),
        lambda: writer.import_rows([{"id": 1000 + i, "label": "v", "sha256": None, "created": 0.0, "metadata": None,
                                     "thumbnail": None, "original": None, "media_type": None} for i in range(4)],
                                   unit(rng, 4)),
    ]
    for step in steps:
        step()
        assert followed(follower, writer) == state(writer) == fresh(root)


def test_follower_behind_several_changes_and_its_own_writes_interleave(pair):
    writer, follower, root = pair
    rng = np.random.default_rng(2)
    writer.add("y", unit(rng, 3))
    writer.rename_class("y", "q")
    writer.add("q", unit(rng, 1))
    follower.add("r", unit(rng, 2))  # catches up first, then writes
    assert state(follower) == fresh(root)  # at once: the write caught up under the database's lock
    writer.remove_class("x")
    assert followed(follower, writer) == state(writer) == fresh(root)


def test_follower_reloads_when_the_log_was_pruned(pair, monkeypatch):
    writer, follower, root = pair
    monkeypatch.setattr(gallery_module, "KEEP_CHANGES", 3)
    rng = np.random.default_rng(3)
    for _ in range(1001):  # pruning runs every 1000 versions
        writer.add("x", unit(rng, 1))
    assert followed(follower, writer) == state(writer) == fresh(root)
