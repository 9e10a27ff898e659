"""Galleries of labelled unit vectors. A database is the durable truth; a FAISS index is derived.

The database is SQLite in ``<data_dir>/<name>/gallery.sqlite`` (the embedded default) or one
PostgreSQL database shared by every replica (``fewshot.stores``). With SQLite, ``index.faiss`` +
``index.json`` beside it are a snapshot of the derived index that makes reopening fast; it is rebuilt
from the database whenever it is missing or older.
Writes are serialised (one lock here, the database's own lock across processes) and each is one
transaction; the index (and the per-class sums behind the prototypes) change only after COMMIT
succeeds, so a failed commit leaves both as they were. Every write also logs its version and what it
changed (``changes``), so other processes holding the same gallery apply it to their own index.
Searches run between writes and never touch the database. No pickle anywhere.
"""
from __future__ import annotations

import json
import re
import threading
import time
import unicodedata
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import (DimensionMismatch, EmptyGallery, FingerprintMismatch, GalleryClosed, InvalidArgument,
                     InvalidLabel, InvalidVector, LabelExists, UnknownExample, UnknownGallery, UnknownLabel)
from .files import write_atomic
from .heads import normalize
from .index import KINDS, VectorIndex
from .stores import Database, Home, Sql, open_home
from .stores.sqlite import SqliteDatabase

MAX_LABEL = 200
MAX_K = 10_000
GALLERY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # matched whole (fullmatch): no trailing newline
# What check_label accepts, as a JSON Schema pattern for the API's documents: something not blank, no
# control characters (C0, DEL, C1); the length limit is MAX_LABEL after stripping.
LABEL_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
SQLITE_MAX_ID = 2**63 - 1  # the largest example id either store gives
DERIVED = ("index.faiss", "index.faiss.fp16", "index.json")
PAGE = 8192  # rows per page when an index is built from the database
LEGACY_BLOBS = ("adapter.npy", "adapter.json")  # files earlier versions kept beside gallery.sqlite
KEEP_CHANGES = 10_000  # versions kept in the change log; a follower further behind reloads everything
IMAGE_KINDS = ("thumbnail", "original")


def check_label(label: object) -> str:
    """A label as stored: stripped, 1..200 characters, no control characters (format characters such
    as the zero-width joiner of emoji sequences are fine)."""
    if not isinstance(label, str):
        raise InvalidLabel(f"a label must be text, got {type(label).__name__}")
    text = label.strip()
    if not text:
        raise InvalidLabel("a label must not be empty")
    if len(text) > MAX_LABEL:
        raise InvalidLabel(f"a label must be at most {MAX_LABEL} characters, got {len(text)}")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text):
        raise InvalidLabel(f"label {text[:40]!r} contains control characters")
    return text


def check_vectors(vectors: np.ndarray, dim: int, keep_unit: bool = False) -> np.ndarray:
    """(n, dim) finite, non-zero -> float32 unit rows; raises DimensionMismatch / InvalidVector.
    ``keep_unit``: rows already of unit length (within float32 rounding) keep their exact values, so a
    gallery copied from another holds the same bytes."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim or x.shape[0] == 0:
        raise DimensionMismatch(f"expected vectors of shape (n, {dim}) with n >= 1, got {np.shape(vectors)}")
    if not np.isfinite(x).all():
        raise InvalidVector("vectors contain NaN or infinity")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InvalidVector("a vector is all zeros")
    if keep_unit and np.allclose(norms, 1.0, rtol=0, atol=1e-5):
        return np.ascontiguousarray(x)
    return np.ascontiguousarray(x / norms)


@dataclass
class ClassInfo:
    label: str
    count: int
    ids: list[int]
    created: float


@dataclass
class KeptImage:
    """What a gallery keeps of an example's image, written with its vector in one transaction."""
    thumbnail: bytes | None  # a small JPEG for pages
    original: bytes | None  # the uploaded bytes, to re-embed with another encoder
    media_type: str | None  # of the original, e.g. image/jpeg


@dataclass
class Lookup:
    """One consistent view of a gallery for a batch of queries (taken under one lock)."""
    version: int
    names: list[str]  # class names, sorted: the columns of proto_scores
    proto_scores: np.ndarray  # (q, C) cosine to each class prototype
    sims: np.ndarray  # (q, m) cosines of the m nearest examples, descending
    classes: np.ndarray  # (q, m) their class numbers (columns of proto_scores); -1 for none


class Gallery:
    """One named gallery: labelled unit vectors of one encoder (dim + fingerprint)."""

    def __init__(self, db: Database | Path, dim: int | None, fingerprint: str | None, encoder: str = "",
                 index: str = "exact") -> None:
        """Open the gallery in ``db`` (a store's ``Database``, or a folder for a SQLite file), or create
        it there (then ``dim`` and ``fingerprint`` are required). Given for an existing gallery, they must
        be its own."""
        if index not in KINDS:
            raise ValueError(f"unknown index {index!r}; choose one of {list(KINDS)}")
        self.index_kind = index
        self._db: Database = SqliteDatabase(Path(db)) if isinstance(db, (str, Path)) else db
        self.name, self.folder = self._db.name, self._db.folder  # folder: None when nothing is kept on disk
        self._lock = threading.RLock()
        self._closed = False
        self._index: VectorIndex | None = None
        self._prototypes: tuple | None = None  # (version, prototypes (C, d), names, column of each name)
        self._touched: set[str] | None = set()  # classes changed since the prototypes were built; None: rebuild
        try:
            self._open(dim, fingerprint, encoder, index)
        except BaseException:
            self._db.close()
            raise

    def _open(self, dim: int | None, fingerprint: str | None, encoder: str, index: str) -> None:
        if not (self._db.created() and self._read_meta()):
            if dim is None or fingerprint is None:
                raise UnknownGallery(f"no gallery {self.name!r}; enroll a class into it to create it")
            made = self._db.create({"dim": str(dim), "fingerprint": fingerprint, "encoder": encoder,
                                    "version": "0", "index": index})
            if made:
                self.dim, self.fingerprint, self.encoder = dim, fingerprint, encoder
            else:  # another process made it at the same moment: open theirs
                self._read_meta()
        if (dim, fingerprint) != (None, None) and (self.dim != dim or self.fingerprint != fingerprint):
            raise FingerprintMismatch(
                f"gallery {self.name!r} holds {self.dim}-d vectors of encoder {self.encoder or '?'} "
                f"(fingerprint {self.fingerprint}); this encoder gives {dim}-d, fingerprint {fingerprint}. "
                "Re-embed into a new gallery to move encoders")
        self._load_index()
        self._take_in_files()

    def _take_in_files(self) -> None:
        """Earlier versions kept the adapter as files beside the database: move them into it."""
        files = [name for name in LEGACY_BLOBS if self.folder is not None and (self.folder / name).is_file()]
        if files:
            self.set_blobs({name: (self.folder / name).read_bytes() for name in files})
            for name in files:
                (self.folder / name).unlink()

    def _read_meta(self, sql: Sql | None = None) -> bool:
        """Take dim, fingerprint, encoder and index kind from the database; False if it has none yet."""
        with self._access(sql) as sql:
            stored = dict(sql.execute("SELECT key, value FROM meta").fetchall())
        if "dim" not in stored:
            return False
        self.dim, self.fingerprint = int(stored["dim"]), stored["fingerprint"]
        self.encoder = stored.get("encoder", "")
        self.index_kind = stored.get("index", "exact")  # chosen when the gallery was made
        return True

    def _access(self, sql: Sql | None):
        """The statement runner to use: the caller's (inside a write or snapshot) or a fresh read."""
        return nullcontext(sql) if sql is not None else self._db.read()

    @property
    def kind(self) -> str:
        """Which store holds it: "sqlite" or "postgresql"."""
        return self._db.kind

    # ------------------------------------------------------------ index
    @property
    def version(self) -> int:
        """Increases with every committed change: a key for caches derived from the gallery."""
        with self._lock:
            self._check_open()
            return self._version()

    def _check_open(self) -> None:
        if self._closed:
            raise GalleryClosed(f"gallery {self.name!r} was closed (evicted or shut down); open it again")

    def _version(self) -> int:
        """The version this process's index shows (reads first take in what others committed)."""
        self._follow()
        return self._applied

    @staticmethod
    def _stored_version(sql: Sql) -> int:
        return int(sql.execute("SELECT value FROM meta WHERE key='version'").fetchone()[0])

    # ------------------------------------------------------------ following other writers
    def _follow(self) -> None:
        """Cheap check on every read: has another connection (another process: a CLI import, another
        server) committed since we looked? Then apply its changes before answering. (On PostgreSQL
        the store's listener applies them as they are announced, so reads never wait on the database.)"""
        if self._db.changed():
            self._catch_up()

    def refresh(self) -> None:
        """Apply whatever other processes committed (called by the store when one announces a change).
        The version is compared outside the lock, so queries go on while the database is slow or away."""
        if self._closed:
            return
        if self._db.relocated():  # another process re-embedded it: everything is new
            with self._lock:
                if not self._closed:
                    self._reload()
            return
        with self._db.read() as sql:
            if self._stored_version(sql) == self._applied:
                return
        with self._lock:
            if not self._closed:
                self._catch_up()

    def _catch_up(self, sql: Sql | None = None) -> None:
        """Apply the changes logged after ``_applied``; reload everything when the log no longer
        reaches back that far. Runs under the lock, in a write (``sql``) or not."""
        with self._access(sql) as sql:
            stored = self._stored_version(sql)
            if stored == self._applied:
                return
            rows = sql.execute("SELECT version, ops FROM changes WHERE version > ? ORDER BY version",
                               (self._applied,)).fetchall()
            if stored < self._applied or not rows or rows[0][0] != self._applied + 1 or rows[-1][0] != stored:
                self._reload(sql)
                return
            for version, ops in rows:
                for op in json.loads(ops):
                    self._apply(op, sql, version)
                self._applied = version

    def _reload(self, sql: Sql | None = None) -> None:
        self._prototypes, self._touched = None, set()
        self._read_meta(sql)
        self._load_index(snapshot=False)

    def _apply(self, op: dict, sql: Sql, version: int) -> None:
        """One logged change (of ``version``), made by another process, into this one's index, class
        sums and blobs. Rows are read as they are now, so later changes to them (also applied) leave
        memory equal to the database."""
        kind = op["op"]
        if kind == "reset":
            self._reload(sql)
        elif kind == "blobs":
            marks = ",".join("?" * len(op["names"]))
            stored = dict(sql.execute(f"SELECT name, data FROM blobs WHERE name IN ({marks})", op["names"]).fetchall())
            self._blobs_set({name: bytes(stored[name]) if name in stored else None for name in op["names"]}, version)
        elif kind == "add":
            for low, high in op["ids"]:
                rows = sql.execute("SELECT id, label, vector FROM examples WHERE id BETWEEN ? AND ? ORDER BY id",
                                   (low, high)).fetchall()
                rows = [r for r in rows if r[0] not in self._labels]
                if rows:
                    x = np.frombuffer(b"".join(r[2] for r in rows), np.float32).reshape(len(rows), self.dim)
                    self._indexed(x, [r[0] for r in rows], [r[1] for r in rows])
        else:  # remove, relabel, rename: vectors from the index, old labels from memory
            if kind == "rename":
                ids = [i for i, label in self._labels.items() if label == op["label"]]
            else:
                ids = [i for low, high in op["ids"] for i in range(low, high + 1) if i in self._labels]
            if not ids:
                return
            x = self._index.vectors_of(ids)
            old = [self._labels[i] for i in ids]
            self._count_in(x, old, -1)
            if kind == "remove":
                self._index.remove(ids)
                for i in ids:
                    self._labels.pop(i, None)
                return
            labels = {}
            for start in range(0, len(ids), 900):  # SQLite binds at most 999 parameters
                chunk = ids[start:start + 900]
                marks = ",".join("?" * len(chunk))
                labels.update(sql.execute(f"SELECT id, label FROM examples WHERE id IN ({marks})", chunk).fetchall())
            gone = [i for i in ids if i not in labels]
            kept = [j for j, i in enumerate(ids) if i in labels]
            self._labels.update({i: labels[i] for i in ids if i in labels})
            self._count_in(x[kept], [labels[ids[j]] for j in kept], +1)
            if gone:
                self._index.remove(gone)
                for i in gone:
                    self._labels.pop(i, None)

    def _log(self, op: str, ids: Sequence[int] = (), **fields) -> None:
        """Inside a write: note what it changes, for the other processes that follow this gallery."""
        self._ops.append({"op": op, "ids": id_runs(ids), **fields})

    def _load_index(self, snapshot: bool = True) -> None:
        """The snapshot file when it matches the database's version, else a build from the database,
        page by page in one consistent view."""
        with self._db.snapshot() as sql:
            version = self._applied = self._stored_version(sql)
            self._blobs: dict[str, bytes] = {name: bytes(data) for name, data in
                                             sql.execute("SELECT name, data FROM blobs").fetchall()}
            self._blobs_version = version
            self._sums: dict[str, np.ndarray] = {}  # per class: float64 sum of its unit vectors
            self._counts: dict[str, int] = {}
            info = self.folder / "index.json" if self.folder is not None else None
            if snapshot and info is not None and (self.folder / "index.faiss").is_file() and info.is_file():
                self._labels: dict[int, str] = dict(sql.execute("SELECT id, label FROM examples").fetchall())
                meta = json.loads(info.read_text())
                if (meta.get("version"), meta.get("count"), meta.get("index")) == (version, len(self._labels),
                                                                                   self.index_kind):
                    self._index = VectorIndex.load(self.folder / "index.faiss", self.dim, self.index_kind)
                    if len(self._index) == len(self._labels):
                        vectors, ids = self._index.all_vectors()
                        self._count_in(vectors, [self._labels[int(i)] for i in ids], +1)
                        return
            self._labels = {}
            self._index = VectorIndex(self.dim, self.index_kind)
            after = -1
            while rows := sql.execute("SELECT id, label, vector FROM examples WHERE id > ? ORDER BY id LIMIT ?",
                                      (after, PAGE)).fetchall():
                ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                labels = [r[1] for r in rows]
                vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
                self._index.add(vectors, ids)
                self._labels.update(zip(ids.tolist(), labels))
                self._count_in(vectors, labels, +1)
                after = int(ids[-1])
        self.snapshot()

    def _count_in(self, vectors: np.ndarray, labels: Sequence[str], sign: int) -> None:
        """Keep the per-class sums (prototypes without a scan) in step with examples added or removed."""
        for row, label in zip(vectors, labels):
            count = self._counts.get(label, 0) + sign
            if self._touched is not None:
                self._touched.add(label)
            if count <= 0 or label not in self._counts:  # a class comes or goes: the table is rebuilt
                self._touched = None
            if count <= 0:
                self._counts.pop(label, None)
                self._sums.pop(label, None)
                continue
            self._counts[label] = count
            self._sums[label] = self._sums.get(label, 0.0) + sign * row.astype(np.float64)

    def snapshot(self) -> None:
        """Write the index snapshot (atomically) so the next open skips the rebuild."""
        if self.folder is None:  # nothing is kept on disk: the index is built from the database
            return
        with self._lock:
            self._check_open()
            version, count = self._version(), len(self._index)
            self._index.save(self.folder / "index.faiss")
            write_atomic(self.folder / "index.json",
                         json.dumps({"version": version, "count": count, "index": self.index_kind}))

    # ------------------------------------------------------------ writes
    @contextmanager
    def _write(self) -> Iterator[tuple[Sql, list[Callable[[], None]]]]:
        """One serialised write transaction that also bumps the version; rolled back on any error.
        Yields (sql, after): the callables put in ``after`` update the in-memory index and run only
        once COMMIT has succeeded, so memory never shows what the database does not hold. (A commit
        whose answer was lost is not applied here either; the log brings it in on the next catch-up.)"""
        with self._lock:
            self._check_open()
            after: list[Callable[[], None]] = []
            self._ops = []
            with self._db.write() as sql:
                self._catch_up(sql)  # what other processes committed comes first
                yield sql, after
                version = self._applied + 1
                sql.execute("UPDATE meta SET value=? WHERE key='version'", (str(version),))
                sql.execute("INSERT INTO changes (version, ops) VALUES (?, ?)", (version, json.dumps(self._ops)))
                if version % 1000 == 0:
                    sql.execute("DELETE FROM changes WHERE version <= ?", (version - KEEP_CHANGES,))
            self._applied = version
            for apply in after:
                apply()

    def add(self, label: str, vectors: np.ndarray, fingerprint: str | None = None,
            sha256: Sequence[str | None] | None = None, metadata: dict | None = None,
            create: bool | None = None, images: Sequence[KeptImage | None] | None = None) -> list[int]:
        """Add examples to ``label``. ``create``: True = must be new (enroll), False = must exist,
        None = either. ``images``: what to keep of each example's image. Returns the new example
        ids, durable (vectors and images) when this returns."""
        label = check_label(label)
        x = check_vectors(vectors, self.dim)
        self.check_fingerprint(fingerprint)
        hashes = list(sha256) if sha256 is not None else [None] * len(x)
        if len(hashes) != len(x):
            raise DimensionMismatch(f"{len(x)} vectors but {len(hashes)} sha256 values")
        kept = list(images) if images is not None else [None] * len(x)
        if len(kept) != len(x):
            raise DimensionMismatch(f"{len(x)} vectors but {len(kept)} kept images")
        meta_json = json.dumps(metadata) if metadata is not None else None
        now = time.time()
        with self._write() as (db, after):
            exists = db.execute("SELECT 1 FROM examples WHERE label=? LIMIT 1", (label,)).fetchone() is not None
            if create is True and exists:
                raise LabelExists(f"class {label!r} already exists; add examples to it instead")
            if create is False and not exists:
                raise UnknownLabel(f"no class {label!r} in gallery {self.name!r}; enroll it first")
            ids = db.insert_ids("INSERT INTO examples (label, vector, fingerprint, sha256, created, metadata) "
                                "VALUES (?, ?, ?, ?, ?, ?)", [(label, row.tobytes(), self.fingerprint, h, now, meta_json)
                                                              for row, h in zip(x, hashes)])
            db.executemany("INSERT INTO images (id, thumbnail, original, media_type) VALUES (?, ?, ?, ?)",
                           [(i, k.thumbnail, k.original, k.media_type) for i, k in zip(ids, kept) if k is not None])
            self._log("add", ids)
            after.append(lambda: self._indexed(x, ids, [label] * len(ids)))
        return ids

    # ------------------------------------------------------------ blobs: small named files kept with the gallery
    def blob(self, name: str) -> bytes | None:
        """A named blob (e.g. the adopted adapter), from memory; None if there is none."""
        with self._lock:
            self._check_open()
            self._follow()
            return self._blobs.get(name)

    @property
    def blobs_version(self) -> int:
        """The gallery version at which the blobs last changed: a key for what is derived from them."""
        with self._lock:
            self._check_open()
            self._follow()
            return self._blobs_version

    def set_blobs(self, blobs: dict[str, bytes | None]) -> None:
        """Store (bytes) or drop (None) named blobs in one transaction; other processes follow."""
        with self._write() as (db, after):
            for name, data in blobs.items():
                if data is None:
                    db.execute("DELETE FROM blobs WHERE name=?", (name,))
                else:
                    db.execute("INSERT INTO blobs (name, data) VALUES (?, ?) "
                               "ON CONFLICT (name) DO UPDATE SET data = excluded.data", (name, bytes(data)))
            self._log("blobs", names=sorted(blobs))
            after.append(lambda: self._blobs_set(blobs, self._applied))

    def _blobs_set(self, blobs: dict[str, bytes | None], version: int) -> None:
        for name, data in blobs.items():
            if data is None:
                self._blobs.pop(name, None)
            else:
                self._blobs[name] = data
        self._blobs_version = version

    def _indexed(self, x: np.ndarray, ids: Sequence[int], labels: Sequence[str]) -> None:
        """After COMMIT: new examples into the index, the label map and the class sums."""
        self._index.add(x, np.asarray(ids, dtype=np.int64))
        self._labels.update(zip(ids, labels))
        self._count_in(x, labels, +1)

    def import_rows(self, rows: Sequence[dict], vectors: np.ndarray) -> None:
        """Add examples with their own ids (``rows`` as from ``kept_rows``, one vector each): a gallery
        being rebuilt from another one keeps its ids, labels, times and images."""
        x = check_vectors(vectors, self.dim, keep_unit=True) if len(rows) else np.zeros((0, self.dim), np.float32)
        if len(rows) != len(x):
            raise DimensionMismatch(f"{len(rows)} rows but {len(x)} vectors")
        if not len(rows):
            return
        with self._write() as (db, after):
            db.executemany("INSERT INTO examples (id, label, vector, fingerprint, sha256, created, metadata) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(r["id"], r["label"], v.tobytes(), self.fingerprint, r["sha256"], r["created"],
                             r["metadata"]) for r, v in zip(rows, x)])
            db.executemany("INSERT INTO images (id, thumbnail, original, media_type) VALUES (?, ?, ?, ?)",
                           [(r["id"], r["thumbnail"], r["original"], r["media_type"]) for r in rows
                            if r["thumbnail"] is not None or r["original"] is not None])
            db.ids_taken()
            self._log("add", [r["id"] for r in rows])
            after.append(lambda: self._indexed(x, [r["id"] for r in rows], [r["label"] for r in rows]))

    def add_many(self, labels: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict | None] | None = None,
                 mark: tuple[str, str] | None = None) -> list[int]:
        """Examples of any classes in one transaction (bulk import). ``mark``: a (key, value) stored in
        the gallery's meta in the same transaction, e.g. how far an import got."""
        labels = [check_label(label) for label in labels]
        x = check_vectors(vectors, self.dim) if labels else np.zeros((0, self.dim), np.float32)
        if len(labels) != len(x):
            raise DimensionMismatch(f"{len(labels)} labels but {len(x)} vectors")
        metas = [json.dumps(m) if m is not None else None for m in (metadata or [None] * len(x))]
        now = time.time()
        with self._write() as (db, after):
            ids = db.insert_ids("INSERT INTO examples (label, vector, fingerprint, created, metadata) VALUES "
                                "(?, ?, ?, ?, ?)", [(label, row.tobytes(), self.fingerprint, now, m)
                                                    for label, row, m in zip(labels, x, metas)])
            if mark is not None:
                db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                           "ON CONFLICT (key) DO UPDATE SET value = excluded.value", mark)
            self._log("add", ids)
            after.append(lambda: self._indexed(x, ids, labels))
        return ids

    def meta_value(self, key: str) -> str | None:
        self._check_open()
        with self._db.read() as sql:  # rows only: no lock, so queries go on meanwhile
            row = sql.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def example_rows(self, after_id: int = -1, limit: int = 8192) -> tuple[list[dict], np.ndarray]:
        """Examples with ids above ``after_id`` in id order: (rows with id, label, metadata; vectors)."""
        self._check_open()
        with self._db.read() as sql:
            rows = sql.execute("SELECT id, label, metadata, vector FROM examples WHERE id > ? ORDER BY id "
                               "LIMIT ?", (after_id, limit)).fetchall()
        x = np.frombuffer(b"".join(r[3] for r in rows), np.float32).reshape(len(rows), self.dim)
        return [{"id": r[0], "label": r[1], "metadata": json.loads(r[2]) if r[2] else None} for r in rows], x

    def kept_rows(self, after_id: int = -1, limit: int = 256, vectors: bool = False) -> list[dict]:
        """Examples with ids above ``after_id``, in id order, with what was kept of their images (and
        each one's stored ``vector`` bytes if asked)."""
        self._check_open()
        with self._db.read() as sql:
            cursor = sql.execute(
                "SELECT e.id, e.label, e.sha256, e.created, e.metadata, i.thumbnail, i.original, i.media_type"
                + (", e.vector" if vectors else "") +
                " FROM examples e LEFT JOIN images i ON i.id = e.id WHERE e.id > ? ORDER BY e.id LIMIT ?",
                (after_id, limit))
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def relabel_example(self, example_id: int, label: str) -> None:
        """Move one example to another class (the class need not exist)."""
        label = check_label(label)
        with self._write() as (db, after):
            row = db.execute("SELECT label, vector FROM examples WHERE id=?", (example_id,)).fetchone()
            if row is None:
                raise UnknownExample(f"no example {example_id} in gallery {self.name!r}")
            db.execute("UPDATE examples SET label=? WHERE id=?", (label, example_id))
            self._log("relabel", [example_id])

            def move() -> None:
                x = np.frombuffer(row[1], np.float32).reshape(1, self.dim)
                self._count_in(x, [row[0]], -1)
                self._count_in(x, [label], +1)
                self._labels[example_id] = label
            after.append(move)

    def labels_by_id(self) -> dict[int, str]:
        with self._lock:
            return dict(self._labels)

    def set_version(self, version: int) -> None:
        """Jump to ``version`` (a rebuilt gallery taking over from an older one); the change log
        restarts there with a reset, so anything following it reloads."""
        with self._lock, self._db.write() as sql:
            sql.execute("UPDATE meta SET value=? WHERE key='version'", (str(int(version)),))
            sql.execute("DELETE FROM changes")
            sql.execute("INSERT INTO changes (version, ops) VALUES (?, ?)", (int(version), json.dumps([{"op": "reset"}])))
        self._applied = int(version)

    def replace_with(self, other: "Gallery") -> None:
        """Become ``other`` (a replacement built in the store's ``scratch`` place, at this gallery's
        version + 1) in one step under the lock: readers see the old gallery until it returns, then the
        new one; ``other`` is closed. The derived index and the adapter go (they belong to the old
        vectors). Raises ``ChangedMeanwhile`` (nothing changed) if another process wrote since this one
        last caught up: catch up and try again."""
        with self._lock, other._lock:
            self._check_open()
            other._check_open()
            self._db.take_over(other._db, self._applied)
            other._closed, other._index = True, None
            if self.folder is not None:
                for name in DERIVED:
                    (self.folder / name).unlink(missing_ok=True)
            self._reload()

    def _check_id(self, example_id: object) -> None:
        if not isinstance(example_id, int) or not 0 <= example_id <= SQLITE_MAX_ID:
            raise UnknownExample(f"no example {example_id} in gallery {self.name!r}: ids are whole numbers "
                                 f"from 0 to {SQLITE_MAX_ID}")

    def _unindex(self, ids: list[int], vectors: list[bytes], label: str) -> None:
        for i in ids:
            self._labels.pop(i, None)
        self._index.remove(ids)
        x = np.frombuffer(b"".join(vectors), np.float32).reshape(len(ids), self.dim)
        self._count_in(x, [label] * len(ids), -1)

    def remove_example(self, example_id: int) -> str:
        """Remove one example; returns its label. Removing a class's last example removes the class."""
        self._check_id(example_id)
        with self._write() as (db, after):
            row = db.execute("SELECT label, vector FROM examples WHERE id=?", (example_id,)).fetchone()
            if row is None:
                raise UnknownExample(f"no example {example_id} in gallery {self.name!r}")
            db.execute("DELETE FROM examples WHERE id=?", (example_id,))
            db.execute("DELETE FROM images WHERE id=?", (example_id,))
            self._log("remove", [example_id])
            after.append(lambda: self._unindex([example_id], [row[1]], row[0]))
        return row[0]

    def remove_class(self, label: str) -> int:
        """Remove a class and its examples; returns how many examples went."""
        label = check_label(label)
        with self._write() as (db, after):
            rows = db.execute("SELECT id, vector FROM examples WHERE label=?", (label,)).fetchall()
            if not rows:
                raise UnknownLabel(f"no class {label!r} in gallery {self.name!r}")
            db.execute("DELETE FROM examples WHERE label=?", (label,))
            db.executemany("DELETE FROM images WHERE id=?", [(r[0],) for r in rows])
            self._log("remove", [r[0] for r in rows])
            after.append(lambda: self._unindex([r[0] for r in rows], [r[1] for r in rows], label))
        return len(rows)

    def rename_class(self, label: str, new_label: str) -> int:
        label, new_label = check_label(label), check_label(new_label)
        with self._write() as (db, after):
            if db.execute("SELECT 1 FROM examples WHERE label=? LIMIT 1", (new_label,)).fetchone():
                raise LabelExists(f"class {new_label!r} already exists; remove it or pick another name")
            ids = [r[0] for r in db.execute("SELECT id FROM examples WHERE label=?", (label,))]
            if not ids:
                raise UnknownLabel(f"no class {label!r} in gallery {self.name!r}")
            db.execute("UPDATE examples SET label=? WHERE label=?", (new_label, label))
            self._log("rename", label=label, new_label=new_label)

            def relabel() -> None:
                self._labels.update({i: new_label for i in ids})
                self._sums[new_label], self._counts[new_label] = self._sums.pop(label), self._counts.pop(label)
                self._touched = None
            after.append(relabel)
        return len(ids)

    # ------------------------------------------------------------ reads
    def __len__(self) -> int:
        index = self._index
        return len(index) if index is not None else 0  # 0 once closed

    def classes(self) -> list[tuple[str, int]]:
        """(label, example count), sorted by label."""
        self._check_open()
        with self._db.read() as sql:  # sorted here: databases collate text differently
            return sorted((r[0], r[1]) for r in sql.execute("SELECT label, COUNT(*) FROM examples GROUP BY label"))

    def count(self, label: str) -> int:
        """Examples of ``label`` (0 if it is not enrolled), from memory."""
        with self._lock:
            self._check_open()
            self._follow()
            return self._counts.get(check_label(label), 0)

    def get_class(self, label: str) -> ClassInfo:
        label = check_label(label)
        self._check_open()
        with self._db.read() as sql:
            rows = sql.execute("SELECT id, created FROM examples WHERE label=? ORDER BY id", (label,)).fetchall()
        if not rows:
            raise UnknownLabel(f"no class {label!r} in gallery {self.name!r}")
        return ClassInfo(label, len(rows), [r[0] for r in rows], min(r[1] for r in rows))

    def image(self, example_id: int, kind: str = "original") -> tuple[bytes, str]:
        """(bytes, media type) of what was kept of an example's image; UnknownExample if nothing was."""
        if kind not in IMAGE_KINDS:
            raise InvalidArgument(f"image kind must be one of {list(IMAGE_KINDS)}, got {kind!r}")
        self._check_id(example_id)
        self._check_open()
        with self._db.read() as sql:
            if sql.execute("SELECT 1 FROM examples WHERE id=?", (example_id,)).fetchone() is None:
                raise UnknownExample(f"no example {example_id} in gallery {self.name!r}")
            row = sql.execute(f"SELECT {kind}, media_type FROM images WHERE id=?", (example_id,)).fetchone()
        if row is None or row[0] is None:
            raise UnknownExample(f"example {example_id} of gallery {self.name!r} has no {kind} image: it was "
                                 "enrolled while images were not kept (FEWSHOT_KEEP_IMAGES)")
        return bytes(row[0]), ("image/jpeg" if kind == "thumbnail" else row[1] or "application/octet-stream")

    def vectors(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Every example: (vectors (n, dim), ids (n,), labels), for the few-shot heads."""
        with self._lock:
            self._check_open()
            self._follow()
            vectors, ids = self._index.all_vectors()
            return vectors, ids, [self._labels[int(i)] for i in ids]

    def versioned_vectors(self) -> tuple[int, np.ndarray, list[str]]:
        """(version, vectors, labels) copied under one lock: a consistent snapshot to work on outside it."""
        with self._lock:
            vectors, _, labels = self.vectors()
            return self._version(), vectors, labels

    def _class_table(self) -> tuple[np.ndarray, list[str], dict[str, int]]:
        """(prototypes (C, d), sorted names, column of each name) for the current version, cached."""
        version = self._version()
        if self._prototypes is not None and self._prototypes[0] == version:
            return self._prototypes[1:]
        if self._prototypes is not None and self._touched is not None:  # same classes: renew changed rows only
            _, protos, names, column = self._prototypes
            for label in self._touched:
                protos[column[label]] = normalize(self._sums[label])
        else:
            names = sorted(self._sums)
            protos = normalize(np.stack([self._sums[n] for n in names])) if names else \
                np.zeros((0, self.dim), np.float32)
            column = {n: j for j, n in enumerate(names)}
        self._prototypes, self._touched = (version, protos, names, column), set()
        return protos, names, column

    def lookup(self, queries: np.ndarray, neighbours: int = 0, fingerprint: str | None = None) -> Lookup:
        """Prototype cosines and the ``neighbours`` nearest examples of each query, from one version.
        ``fingerprint``: the encoder the queries come from, checked under the same lock (a gallery
        re-embedded meanwhile refuses them rather than compare across encoders)."""
        m = check_k(neighbours, low=0)
        with self._lock:
            self._check_open()
            self.check_fingerprint(fingerprint)
            x = check_vectors(queries, self.dim)
            self._follow()
            if len(self._index) == 0:
                raise EmptyGallery(f"gallery {self.name!r} is empty; enroll at least one image first")
            protos, names, column = self._class_table()
            sims, ids = self._index.search(x, m) if m else (np.zeros((len(x), 0), np.float32),) * 2
            classes = np.array([[column[self._labels[int(i)]] if i != -1 else -1 for i in row] for row in ids],
                               np.int64).reshape(sims.shape)
            return Lookup(self._version(), names, x @ protos.T, sims, classes)

    def check_fingerprint(self, fingerprint: str | None) -> None:
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise FingerprintMismatch(f"vectors come from encoder fingerprint {fingerprint}; gallery {self.name!r} "
                                      f"holds {self.fingerprint}. Re-embed, never mix")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        """(n, dim) -> scores (n, k'), ids (n, k'), labels per row; k' = min(k, examples)."""
        x = check_vectors(queries, self.dim)
        k = check_k(k)
        with self._lock:
            self._check_open()
            self._follow()
            if len(self._index) == 0:
                raise EmptyGallery(f"gallery {self.name!r} is empty; enroll at least one image first")
            scores, ids = self._index.search(x, k)
            return scores, ids, [[self._labels[int(i)] for i in row if i != -1] for row in ids]

    def close(self) -> None:
        """Snapshot the index and close the database; later calls raise GalleryClosed. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self.snapshot()
            finally:
                self._db.close()
                self._closed = True
            self._index = None


def id_runs(ids: Sequence[int]) -> list[list[int]]:
    """Example ids as [low, high] runs: a batch insert logs two numbers, not ten thousand."""
    runs: list[list[int]] = []
    for i in sorted(int(i) for i in ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


def check_k(k: int, low: int = 1) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not low <= k <= MAX_K:
        raise InvalidArgument(f"k must be a whole number from {low} to {MAX_K}, got {k!r}")
    return int(k)


class GalleryStore:
    """Named galleries (one per tenant) in one place: a data directory of SQLite files, or a PostgreSQL
    database (``postgresql://...``) that other processes and replicas share. At most ``max_open`` are open.

    Past ``max_open``, the least recently used gallery that nobody is using (see ``use``) is closed:
    its index leaves memory and comes back from its snapshot on the next use. ``on_close(name)``
    lets the owner drop what it derived from a closed gallery. Open galleries follow what other
    processes commit to them.
    """

    def __init__(self, location: str | Path, max_open: int | None = None,
                 on_close: Callable[[str], None] | None = None) -> None:
        if max_open is not None and max_open < 1:
            raise InvalidArgument(f"max_open must be at least 1, got {max_open}")
        self.home: Home = open_home(location)
        self.root: Path | None = getattr(self.home, "root", None)  # the data directory; None on PostgreSQL
        self.kind = "sqlite" if self.root is not None else "postgresql"
        self.max_open, self.on_close = max_open, on_close
        self._open: OrderedDict[str, Gallery] = OrderedDict()  # least recently used first
        self._users: dict[str, int] = {}
        self._lock = threading.Lock()
        self.home.follow(self._changed, self._everything)

    def _changed(self, name: str) -> None:
        with self._lock:
            gallery = self._open.get(name)
        if gallery is not None:
            gallery.refresh()

    def _everything(self) -> None:
        for gallery in self.opened().values():
            gallery.refresh()

    @staticmethod
    def check_name(name: str) -> str:
        if not isinstance(name, str) or not GALLERY_NAME.fullmatch(name):
            raise InvalidLabel(f"gallery name {str(name)[:70]!r} must be 1-64 letters, digits, '_', '.' or '-', "
                               "starting with a letter or digit")
        return name

    def names(self) -> list[str]:
        return self.home.names()

    def describe(self, name: str) -> dict | None:
        """A gallery's encoder, dim and fingerprint without opening it (None if there is no such gallery)."""
        name = self.check_name(name)
        with self._lock:
            if name in self._open:
                g = self._open[name]
                return {"encoder": g.encoder, "dim": g.dim, "fingerprint": g.fingerprint}
        meta = self.home.describe(name)
        if not meta or "dim" not in meta:
            return None
        return {"encoder": meta.get("encoder", ""), "dim": int(meta["dim"]), "fingerprint": meta["fingerprint"]}

    def get(self, name: str, dim: int | None = None, fingerprint: str | None = None, encoder: str = "",
            create: bool = False,
            index: str = "exact") -> Gallery:
        """An open gallery; ``create`` makes it when missing, else UnknownGallery."""
        with self._lease(name, dim, fingerprint, encoder, create, index, hold=False) as gallery:
            return gallery

    @contextmanager
    def use(self, name: str, dim: int | None = None, fingerprint: str | None = None, encoder: str = "",
            create: bool = False,
            index: str = "exact") -> Iterator[Gallery]:
        """Like ``get``, and the gallery stays open (is never evicted) until the block ends."""
        with self._lease(name, dim, fingerprint, encoder, create, index, hold=True) as gallery:
            yield gallery

    @contextmanager
    def _lease(self, name, dim, fingerprint, encoder, create, index, hold: bool) -> Iterator[Gallery]:
        name = self.check_name(name)
        with self._lock:
            if name not in self._open:
                if not create and not self.home.exists(name):
                    raise UnknownGallery(f"no gallery {name!r}; enroll a class into it to create it")
                self._open[name] = Gallery(self.home.open(name), dim, fingerprint, encoder, index)
            self._open.move_to_end(name)
            gallery = self._open[name]
            self._users[name] = self._users.get(name, 0) + hold
            closing = self._evict()
        self._closed(closing)
        try:
            if (dim, fingerprint) != (None, None) and (gallery.dim, gallery.fingerprint) != (dim, fingerprint):
                raise FingerprintMismatch(f"gallery {name!r} holds {gallery.dim}-d vectors of fingerprint "
                                          f"{gallery.fingerprint}; got {dim}-d, {fingerprint}. Re-embed, never mix")
            yield gallery
        finally:
            if hold:
                with self._lock:
                    self._users[name] -= 1
                    closing = self._evict()
                self._closed(closing)

    def _evict(self) -> list[Gallery]:
        """Under the lock: take the least recently used idle galleries out, past ``max_open``."""
        out = []
        if self.max_open is None:
            return out
        for name in list(self._open):
            if len(self._open) <= self.max_open:
                break
            if not self._users.get(name):
                out.append(self._open.pop(name))
                self._users.pop(name, None)
        return out

    def _closed(self, galleries: list[Gallery]) -> None:
        for gallery in galleries:
            gallery.close()
            if self.on_close:
                self.on_close(gallery.name)

    def opened(self) -> dict[str, Gallery]:
        """The galleries open in this process, by name."""
        with self._lock:
            return dict(self._open)

    def close(self) -> None:
        with self._lock:
            galleries = list(self._open.values())
            self._open.clear()
            self._users.clear()
        try:
            self._closed(galleries)
        finally:
            self.home.close()
