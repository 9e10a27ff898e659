"""Moving galleries between stores, and what the PostgreSQL store does on its own: migrations,
bound parameters, a database that is not there."""
from __future__ import annotations

import numpy as np
import pytest

from fewshot.cli import main
from fewshot.errors import InvalidArgument, StoreUnavailable
from fewshot.gallery_store import GalleryStore
from fewshot.images import KeptImage

DIM = 12


def unit(rng, n):
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill(location) -> dict:
    """Two galleries with removed ids (gaps), odd labels, metadata and kept images; returns what was put in."""
    rng = np.random.default_rng(0)
    store = GalleryStore(location)
    try:
        shop = store.get("shop", DIM, "fp", "test", create=True)
        for label in ["apple", "O'Brien\"; DROP TABLE examples; --", "日本"]:
            shop.add(label, unit(rng, 3), images=[KeptImage(b"thumb", label.encode(), "image/png")] * 3,
                     metadata={"from": label})
        shop.remove_example(shop.rows.get_class("apple").ids[1])
        staff = store.get("staff", DIM, "fp", "test", create=True, index="hnsw")
        staff.add_many([f"p{i % 7}" for i in range(50)], unit(rng, 50))
        return {name: store.get(name).vectors() for name in ("shop", "staff")}
    finally:
        store.close()


def same(location, expected: dict) -> None:
    store = GalleryStore(location)
    try:
        assert store.names() == sorted(expected)
        for name, (vectors, ids, labels) in expected.items():
            g = store.get(name)
            got_vectors, got_ids, got_labels = g.vectors()
            order, want = np.argsort(got_ids), np.argsort(ids)
            assert got_ids[order].tolist() == ids[want].tolist()
            assert [got_labels[i] for i in order] == [labels[i] for i in want]
            assert got_vectors[order].tobytes() == vectors[want].tobytes()
        shop = store.get("shop")
        example = shop.rows.get_class("日本").ids[0]
        assert shop.rows.image(example) == ("日本".encode(), "image/png") and shop.rows.image(example, "thumbnail")[0] == b"thumb"
        assert store.get("staff").index_kind == "hnsw"
    finally:
        store.close()


def test_copy_sqlite_to_postgresql_and_back(tmp_path, database_url, capsys):
    expected = fill(tmp_path / "a")
    assert main(["gallery", "copy", "--from", f"sqlite:{tmp_path / 'a'}", "--to", database_url, "--quiet"]) == 0
    assert "verified: 8 example(s)" in capsys.readouterr().out
    same(database_url, expected)
    assert main(["gallery", "copy", "--from", database_url, "--to", f"sqlite:{tmp_path / 'b'}", "--quiet"]) == 0
    same(tmp_path / "b", expected)
    # and again: nothing left to copy, still verified
    assert main(["gallery", "copy", "--from", f"sqlite:{tmp_path / 'a'}", "--to", database_url, "--quiet"]) == 0
    assert "copied 0 example(s) (8 by an earlier run)" in capsys.readouterr().out


def test_interrupted_copy_continues_and_a_target_with_other_examples_is_refused(tmp_path, database_url):
    from fewshot.transfer import copy_galleries

    expected = fill(tmp_path / "a")
    source, target = GalleryStore(tmp_path / "a"), GalleryStore(database_url)
    try:
        with source.use("staff") as src, target.use("staff", DIM, "fp", "test", create=True, index="hnsw") as dst:
            rows = src.rows.kept(-1, 20, vectors=True)  # an interrupted run got this far
            dst.import_rows(rows, np.frombuffer(b"".join(r.pop("vector") for r in rows), np.float32).reshape(20, DIM))
        reports = {r.gallery: r for r in copy_galleries(source, target, progress=False)}
        assert (reports["staff"].already, reports["staff"].copied, reports["staff"].examples) == (20, 30, 50)
        target.get("staff").add("intruder", unit(np.random.default_rng(1), 1))
        with pytest.raises(InvalidArgument, match="holds 1 example"):
            copy_galleries(source, target, ["staff"], progress=False)
        fresh = target.get("staff").add("p0", unit(np.random.default_rng(2), 1))  # ids continue above copied ones
        assert min(fresh) > max(expected["staff"][1])
    finally:
        source.close()
        target.close()


def test_migrations_run_once_and_are_recorded(database_url):
    import psycopg

    from fewshot.stores.pg_migrations import MIGRATIONS
    from fewshot.stores.schema import LATEST

    for _ in range(2):  # a second start (another replica) finds everything done
        store = GalleryStore(database_url)
        store.get("g", DIM, "fp", create=True)
        store.close()
    with psycopg.connect(database_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM fewshot.migrations ORDER BY version")]
        assert versions == [v for v, _, _ in MIGRATIONS]
        schema = conn.execute("SELECT schema FROM fewshot.galleries WHERE name = 'g'").fetchone()[0]
        conn.execute("SELECT set_config('search_path', %s, false)", (schema,))
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(LATEST)


# The layout every SQLite gallery file had before schema versions (written out here as it shipped).
LEGACY_SQLITE = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE examples (id INTEGER PRIMARY KEY AUTOINCREMENT, label TEXT NOT NULL, vector BLOB NOT NULL,
    fingerprint TEXT NOT NULL, sha256 TEXT, created REAL NOT NULL, metadata TEXT);
CREATE INDEX examples_label ON examples(label);
CREATE TABLE images (id INTEGER PRIMARY KEY, thumbnail BLOB, original BLOB, media_type TEXT);
CREATE TABLE changes (version INTEGER PRIMARY KEY, ops TEXT NOT NULL);
"""


@pytest.mark.parametrize("blobs", [False, True], ids=["before-blobs", "with-blobs"])
def test_a_data_directory_from_before_schema_versions_opens_and_is_migrated_in_place(tmp_path, blobs):
    import sqlite3

    from fewshot.stores.schema import LATEST

    folder = tmp_path / "old"
    folder.mkdir()
    db = sqlite3.connect(folder / "gallery.sqlite")
    db.executescript(LEGACY_SQLITE + ("CREATE TABLE blobs (name TEXT PRIMARY KEY, data BLOB NOT NULL);" if blobs else ""))
    x = unit(np.random.default_rng(5), 2)
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("dim", str(DIM)), ("fingerprint", "fp"), ("encoder", "e"),
                                                       ("version", "1")])
    db.executemany("INSERT INTO examples (label, vector, fingerprint, created) VALUES (?, ?, 'fp', 0)",
                   [("cat", x[0].tobytes()), ("dog", x[1].tobytes())])
    db.commit()
    db.close()
    store = GalleryStore(tmp_path)
    g = store.get("old")
    assert g.rows.classes() == [("cat", 1), ("dog", 1)] and len(g) == 2
    g.set_blobs({"note": b"kept"})  # the table migration 2 made (or found)
    store.close()
    db = sqlite3.connect(folder / "gallery.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == LATEST
    assert db.execute("SELECT data FROM blobs").fetchall() == [(b"kept",)]
    db.close()
    assert GalleryStore(tmp_path).get("old").search(x[:1], 1)[2] == [["cat"]]


def test_a_database_that_is_not_there_says_so(tmp_path):
    from fewshot.stores.postgres import PostgresHome

    with pytest.raises(StoreUnavailable, match="cannot reach the gallery database .*secret|Check that PostgreSQL") as e:
        PostgresHome(f"postgresql://fewshot:secret@/none?host={tmp_path}&port=1", wait=0.5)
    assert "secret" not in str(e.value)  # the password never reaches a message


def test_a_replaced_gallery_schema_is_dropped_after_a_while(database_url, monkeypatch):
    import psycopg

    from fewshot.reembed import reembed
    from fewshot.stores import postgres

    store = GalleryStore(database_url)
    g = store.get("g", DIM, "fp", create=True)
    g.add("x", unit(np.random.default_rng(3), 1), images=[KeptImage(None, b"\x01image", "image/png")])
    old = g._db.schema
    reembed(store, "g", "other", 4, "fp2", lambda images: [np.eye(4, dtype=np.float32)[0] for _ in images])
    assert g._db.schema != old and g.fingerprint == "fp2" and store.names() == ["g"]
    with psycopg.connect(database_url) as conn:
        exists = "SELECT count(*) FROM pg_namespace WHERE nspname = %s"
        assert conn.execute(exists, (old,)).fetchone()[0] == 1  # replicas may still read it for a moment
        monkeypatch.setattr(postgres, "RETIRE_AFTER", 0.0)
        store.home.sweep()
        assert conn.execute(exists, (old,)).fetchone()[0] == 0
    store.close()
