"""Gallery: SQLite truth + FAISS index; exact search, atomic operations, bad input changes nothing,
reopen from snapshot or rebuild, and every acknowledged enrollment survives kill -9."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

from fewshot.errors import (DimensionMismatch, EmptyGallery, FingerprintMismatch, GalleryClosed, InvalidArgument,
                            InvalidLabel, InvalidVector, LabelExists, UnknownExample, UnknownGallery, UnknownLabel)
from fewshot.gallery_store import GalleryStore

DIM = 16


def unit(rng, n, dim=DIM):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def store(location):
    s = GalleryStore(location)
    yield s
    s.close()


@pytest.fixture
def gallery(store):
    g = store.get("shop", DIM, "fp-a", "test", create=True)
    rng = np.random.default_rng(0)
    for label in ["apple", "banana", "cherry"]:
        g.add(label, unit(rng, 3), create=True)
    return g


def state(g):
    vectors, ids, labels = g.vectors()
    return g.rows.classes(), ids.tolist(), labels, vectors.round(6).tolist()


def test_search_matches_numpy(store):
    g = store.get("big", DIM, "fp", create=True)
    rng = np.random.default_rng(1)
    x = unit(rng, 300)
    for i in range(0, 300, 30):
        g.add(f"c{i // 30}", x[i:i + 30])
    q = unit(rng, 20)
    scores, ids, labels = g.search(q, 5)
    expected = np.argsort(-(q @ x.T), axis=1)[:, :5] + 1  # ids start at 1, in insertion order
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.sort(q @ x.T, axis=1)[:, ::-1][:, :5], atol=1e-5)
    assert labels[0][0] == f"c{(expected[0, 0] - 1) // 30}"


def test_operations(gallery):
    assert gallery.rows.classes() == [("apple", 3), ("banana", 3), ("cherry", 3)]
    info = gallery.rows.get_class("banana")
    assert info.count == 3 and len(info.ids) == 3
    new = gallery.add("banana", np.ones((2, DIM)), create=False)
    assert gallery.rows.get_class("banana").count == 5 and len(new) == 2
    assert gallery.rename_class("banana", "plantain") == 5
    assert ("plantain", 5) in gallery.rows.classes() and ("banana", 5) not in gallery.rows.classes()
    assert gallery.remove_example(new[0]) == "plantain"
    assert gallery.remove_class("cherry") == 3
    assert gallery.rows.classes() == [("apple", 3), ("plantain", 4)]
    assert len(gallery) == 7
    _, _, labels = gallery.search(np.ones((1, DIM)), 1)
    assert labels == [["plantain"]]


BAD = [
    ("wrong dimension", lambda g: g.add("apple", np.ones((1, DIM + 1))), DimensionMismatch),
    ("NaN", lambda g: g.add("apple", np.full((1, DIM), np.nan)), InvalidVector),
    ("inf", lambda g: g.add("apple", np.full((1, DIM), np.inf)), InvalidVector),
    ("zero vector", lambda g: g.add("apple", np.zeros((1, DIM))), InvalidVector),
    ("no vectors", lambda g: g.add("apple", np.zeros((0, DIM))), DimensionMismatch),
    ("empty label", lambda g: g.add("  ", np.ones((1, DIM))), InvalidLabel),
    ("long label", lambda g: g.add("x" * 201, np.ones((1, DIM))), InvalidLabel),
    ("control char", lambda g: g.add("a\x00b", np.ones((1, DIM))), InvalidLabel),
    ("newline", lambda g: g.add("a\nb", np.ones((1, DIM))), InvalidLabel),
    ("label not text", lambda g: g.add(5, np.ones((1, DIM))), InvalidLabel),
    ("enroll existing", lambda g: g.add("apple", np.ones((1, DIM)), create=True), LabelExists),
    ("add to unknown", lambda g: g.add("kiwi", np.ones((1, DIM)), create=False), UnknownLabel),
    ("other encoder", lambda g: g.add("apple", np.ones((1, DIM)), fingerprint="fp-b"), FingerprintMismatch),
    ("unknown example", lambda g: g.remove_example(999), UnknownExample),
    ("id past SQLite's range", lambda g: g.remove_example(1180591620717411303424), UnknownExample),
    ("negative id", lambda g: g.remove_example(-1), UnknownExample),
    ("k of 0", lambda g: g.search(np.ones((1, DIM)), 0), InvalidArgument),
    ("unknown class", lambda g: g.remove_class("kiwi"), UnknownLabel),
    ("rename unknown", lambda g: g.rename_class("kiwi", "melon"), UnknownLabel),
    ("rename onto existing", lambda g: g.rename_class("apple", "banana"), LabelExists),
    ("get unknown", lambda g: g.rows.get_class("kiwi"), UnknownLabel),
    ("search wrong dim", lambda g: g.search(np.ones((1, 3)), 1), DimensionMismatch),
    ("search NaN", lambda g: g.search(np.full((1, DIM), np.nan), 1), InvalidVector),
]


@pytest.mark.parametrize("name, call, error", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_domain_error_and_changes_nothing(gallery, name, call, error):
    before = state(gallery)
    with pytest.raises(error) as info:
        call(gallery)
    assert str(info.value)
    assert state(gallery) == before


def test_store_errors(store, gallery):
    with pytest.raises(UnknownGallery, match="no gallery"):
        store.get("nope", DIM, "fp-a")
    for bad in ("../etc", "demo\n", "demo%0A", "", "-x", "x" * 65):
        with pytest.raises(InvalidLabel, match="gallery name"):
            store.get(bad, DIM, "fp-a", create=True)
    with pytest.raises(FingerprintMismatch, match="Re-embed"):
        store.get("shop", DIM, "fp-other")
    empty = store.get("empty", DIM, "fp-a", create=True)
    with pytest.raises(EmptyGallery, match="enroll"):
        empty.search(np.ones((1, DIM)), 1)
    assert store.names() == ["empty", "shop"]


def test_reopen_from_snapshot_and_rebuild_when_stale(tmp_path):
    rng = np.random.default_rng(2)
    store = GalleryStore(tmp_path)
    g = store.get("g", DIM, "fp", create=True)
    g.add("a", unit(rng, 5))
    store.close()  # writes the snapshot
    g = GalleryStore(tmp_path).get("g", DIM, "fp")
    before = state(g)
    g.add("b", unit(rng, 2))  # no close: the snapshot is now stale
    g._db.close()
    reopened = GalleryStore(tmp_path).get("g", DIM, "fp")
    assert reopened.rows.classes() == [("a", 5), ("b", 2)] and len(reopened) == 7
    (tmp_path / "g" / "index.faiss").unlink()
    rebuilt = GalleryStore(tmp_path).get("g", DIM, "fp")
    assert rebuilt.rows.classes() == [("a", 5), ("b", 2)] and len(rebuilt) == 7
    assert before[0] == [("a", 5)]


def test_queries_run_while_enrollments_commit(store):
    g = store.get("busy", DIM, "fp", create=True)
    rng = np.random.default_rng(3)
    g.add("seed", unit(rng, 1))
    errors = []

    def query():
        try:
            for _ in range(200):
                g.search(unit(np.random.default_rng(), 4), 3)
        except Exception as exc:  # noqa: BLE001 - the test reports any failure
            errors.append(exc)

    threads = [threading.Thread(target=query) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(100):
        g.add(f"c{i % 10}", unit(rng, 1))
    for t in threads:
        t.join()
    assert not errors and len(g) == 101 and sum(c for _, c in g.rows.classes()) == 101


def test_acknowledged_enrollments_survive_kill_9(location):
    """A child enrolls and prints each id once add() returns; we kill -9 it mid-stream."""
    script = textwrap.dedent(f"""
        import sys, numpy as np
        from fewshot.gallery_store import GalleryStore
        from fewshot.images import KeptImage
        g = GalleryStore({str(location)!r}).get("g", {DIM}, "fp", create=True)
        rng = np.random.default_rng(0)
        for i in range(100000):
            kept = [KeptImage(b"thumb%d" % i, b"original%d" % i, "image/png")] * 2
            ids = g.add(f"class{{i % 50}}", rng.normal(size=(2, {DIM})), images=kept)
            print(" ".join(map(str, ids)), flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    deadline = time.monotonic() + 60
    while len(acknowledged) < 200 and time.monotonic() < deadline:
        acknowledged += [int(i) for i in child.stdout.readline().split()]
    child.send_signal(signal.SIGKILL)
    child.wait()
    acknowledged += [int(i) for line in child.stdout.read().splitlines() for i in line.split()]
    assert len(acknowledged) >= 200
    g = GalleryStore(location).get("g", DIM, "fp")
    _, ids, _ = g.vectors()
    assert set(acknowledged) <= set(ids.tolist())
    assert len(g) == len(ids) == sum(c for _, c in g.rows.classes())
    assert all(g.rows.image(i)[0].startswith(b"original") and g.rows.image(i, "thumbnail")[0].startswith(b"thumb")
               for i in acknowledged)  # each image committed with its vector


def test_hnsw_gallery_finds_what_exact_finds_and_removes(location):
    rng = np.random.default_rng(4)
    x = unit(rng, 500)
    exact = GalleryStore(location).get("e", DIM, "fp", create=True)
    approx = GalleryStore(location).get("a", DIM, "fp", create=True, index="hnsw")
    for g in (exact, approx):
        for i in range(0, 500, 50):
            g.add(f"c{i // 50}", x[i:i + 50])
    q = unit(rng, 50)
    _, exact_ids, _ = exact.search(q, 10)
    _, approx_ids, _ = approx.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_ids, approx_ids)])
    assert recall >= 0.95
    approx.remove_class("c0")
    assert len(approx) == 450 and ("c0", 50) not in approx.rows.classes()
    _, ids, labels = approx.search(x[:5], 3)
    assert all(label != "c0" for row in labels for label in row)
    approx.close()
    reopened = GalleryStore(location).get("a", DIM, "fp")
    assert reopened.index_kind == "hnsw" and len(reopened) == 450


@contextmanager
def refused_commits(gallery):
    """Make the gallery's database refuse every COMMIT, as a full disk would; yields the error raised."""
    if gallery.kind == "sqlite":
        import sqlite3

        def deny_commit(action, arg1, *_):
            return sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT" else \
                sqlite3.SQLITE_OK
        gallery._db._db.set_authorizer(deny_commit)  # the one way to make SQLite refuse a COMMIT on demand
        try:
            yield sqlite3.DatabaseError
        finally:
            gallery._db._db.set_authorizer(None)
        return
    import psycopg

    with gallery._db.home.connection() as conn:  # a deferred constraint trigger fails at COMMIT itself
        conn.execute(f"SET search_path TO {gallery._db.schema}")
        conn.execute("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN RAISE EXCEPTION 'commit refused by the test'; END $$")
        conn.execute("CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON changes DEFERRABLE INITIALLY DEFERRED "
                     "FOR EACH ROW EXECUTE FUNCTION refuse()")
    try:
        yield psycopg.Error
    finally:
        with gallery._db.home.connection() as conn:
            conn.execute(f"DROP TRIGGER refuse ON {gallery._db.schema}.changes")


def test_index_follows_the_database_only_after_commit(gallery):
    """A COMMIT that fails (as on a full disk) leaves the index, the class sums and the database as they were."""
    before = state(gallery)
    protos_before = gallery.lookup(np.ones((1, DIM))).proto_scores
    with refused_commits(gallery) as error:
        for change in (lambda: gallery.add("apple", np.ones((1, DIM))), lambda: gallery.add("kiwi", np.ones((2, DIM))),
                       lambda: gallery.remove_class("banana"), lambda: gallery.remove_example(1),
                       lambda: gallery.rename_class("cherry", "plum")):
            with pytest.raises(error):
                change()
            assert state(gallery) == before and len(gallery) == 9
            np.testing.assert_array_equal(gallery.lookup(np.ones((1, DIM))).proto_scores, protos_before)
    assert gallery.add("kiwi", np.ones((1, DIM))) and len(gallery) == 10  # and it works again afterwards


def test_lookup_prototypes_follow_every_change(gallery):
    """The class sums kept beside the index (and the prototype rows renewed in place) give the same
    prototypes as recomputing them from every vector, after each kind of change."""
    from fewshot.heads import prototypes

    rng = np.random.default_rng(8)
    q = unit(rng, 3)
    changes = [lambda: None, lambda: gallery.add("apple", unit(rng, 2)),
               lambda: gallery.remove_example(gallery.rows.get_class("banana").ids[0]),
               lambda: gallery.add("kiwi", unit(rng, 1)), lambda: gallery.rename_class("cherry", "plum"),
               lambda: gallery.add("plum", unit(rng, 1)), lambda: gallery.remove_class("apple")]
    for change in changes:
        change()
        vectors, _, labels = gallery.vectors()
        protos, names = prototypes(vectors, labels)
        found = gallery.lookup(q, 4)
        assert found.names == names and gallery.count(names[0]) == labels.count(names[0])
        np.testing.assert_allclose(found.proto_scores, q @ protos.T, atol=1e-5)
        np.testing.assert_allclose(found.sims, np.sort(q @ vectors.T, axis=1)[:, ::-1][:, :4], atol=1e-5)
    assert names == ["banana", "kiwi", "plum"]


def test_store_keeps_at_most_max_open_and_never_evicts_one_in_use(location):
    closed = []
    store = GalleryStore(location, max_open=2, on_close=closed.append)
    rng = np.random.default_rng(9)
    for name in "abc":
        store.get(name, DIM, "fp", create=True).add("x", unit(rng, 1))
    assert list(store.opened()) == ["b", "c"] and closed == ["a"]  # least recently used went first
    with store.use("b", DIM, "fp") as b:
        store.get("a", DIM, "fp")  # over the limit with b held: c, idle, goes
        store.get("d", DIM, "fp", create=True)  # then a
        assert "b" in store.opened() and len(b) == 1  # in use: never evicted, whatever came after
    assert list(store.opened()) == ["b", "d"]
    store.get("a", DIM, "fp")
    assert list(store.opened()) == ["d", "a"]  # once released, b is the least recently used and goes
    with pytest.raises(GalleryClosed, match="open it again"):
        b.search(unit(rng, 1), 1)
    assert len(store.get("b", DIM, "fp")) == 1  # reopened from its snapshot, nothing lost
    store.close()


