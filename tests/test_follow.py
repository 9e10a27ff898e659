"""Two handles on one gallery (two processes: a server and `fewshot gallery import`, or two replicas):
what one commits, the other's index, labels and prototypes show (SQLite: on its next read;
PostgreSQL: once the notice arrives, well within a second), equal to a fresh open of the database,
through every kind of change and after the change log was pruned. Both stores."""
from __future__ import annotations

import time

import numpy as np
import pytest

from fewshot import changelog
from fewshot.gallery_store import GalleryStore

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
        lambda: writer.relabel_example(writer.rows.get_class("y").ids[0], "z"),
        lambda: writer.remove_example(writer.rows.get_class("x").ids[0]),
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
    monkeypatch.setattr(changelog, "KEEP_CHANGES", 3)
    rng = np.random.default_rng(3)
    for _ in range(1001):  # pruning runs every 1000 versions
        writer.add("x", unit(rng, 1))
    assert followed(follower, writer) == state(writer) == fresh(root)


def test_an_adopted_adapter_is_used_by_every_process_holding_the_gallery(pair):
    """The adapter lives in the gallery's database: adopted through one handle, the other's recognizer
    uses it too, and dropping it reaches both."""
    from fewshot.adapt import Adapter
    from fewshot.recognize import Recognizer

    writer, follower, _ = pair
    rng = np.random.default_rng(4)
    writer.add("y", unit(rng, 2))
    mine, theirs = Recognizer(writer), Recognizer(follower)
    weight = rng.normal(scale=0.3, size=(DIM, DIM)).astype(np.float32)
    mine.set_adapter(Adapter(weight))
    q = unit(rng, 2)
    followed(follower, writer)
    assert theirs.adapter is not None and theirs.adapter.weight.tobytes() == weight.tobytes()
    np.testing.assert_allclose(theirs.scores(q)[0], mine.scores(q)[0], atol=1e-6)
    mine.set_adapter(None)
    followed(follower, writer)
    assert theirs.adapter is None and mine.adapter is None


def test_adapter_files_of_earlier_versions_move_into_the_database(tmp_path):
    from fewshot.recognize import Recognizer

    store = GalleryStore(tmp_path)
    store.get("g", DIM, "fp", create=True).add("x", unit(np.random.default_rng(5), 2))
    store.close()
    weight = np.eye(DIM, dtype=np.float32) * 0.5
    np.save(tmp_path / "g" / "adapter.npy", weight, allow_pickle=False)  # as earlier versions left it
    (tmp_path / "g" / "adapter.json").write_text('{"adopted": true}')
    store = GalleryStore(tmp_path)
    g = store.get("g")
    assert Recognizer(g).adapter.weight.tobytes() == weight.tobytes()
    assert not (tmp_path / "g" / "adapter.npy").exists() and g.blobs()[1].get("adapter.json") == b'{"adopted": true}'
    store.close()
    assert Recognizer(GalleryStore(tmp_path).get("g")).adapter is not None  # from the database now
