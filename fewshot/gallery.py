"""One gallery of labelled unit vectors: the database is the durable truth, memory (``fewshot.memory``)
is derived from it, and this class decides who may change which, and when.

Two locks, never held across each other's work:
- ``_writing``: one applier at a time in this process (a write, a catch-up, a reload, a swap), always
  taken before any lock of the store. A write waits for it and then for the database within one
  deadline (``WRITE_WAIT``: 503 after it), and holds nothing a query needs meanwhile.
- ``_reading``: held only for in-memory work, by queries and by the applier as it changes memory after
  COMMIT. No thread holds it while it waits on the database, so queries answer from memory as fast as
  ever while the database is slow or away; the version an answer reports is the one it was read at.

Following other processes is one verb, ``follow()``: apply the change log past memory's version
(``fewshot.changelog``), or reload everything when the log does not reach back. Reads of rows (listing,
images) go to ``rows`` and take neither lock.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from . import changelog, rows as rows_
from .changelog import Changes
from .errors import (EmptyGallery, FingerprintMismatch, GalleryClosed, StoreUnavailable, UnknownGallery)
from .index import KINDS
from .memory import SNAPSHOT_FILES, Lookup, Memory, Step
from .rows import Rows
from .stores import Database, Sql
from .stores.sqlite import SqliteDatabase
from .validate import check_k, check_label, check_vectors
from .writes import Writes

LEGACY_BLOBS = ("adapter.npy", "adapter.json")  # files earlier versions kept beside gallery.sqlite
WRITE_WAIT = 3.0  # seconds a write waits, for this process's other writers and the database, before 503


class Gallery(Writes):
    """One named gallery: labelled unit vectors of one encoder (dim + fingerprint)."""

    def __init__(self, db: Database | Path, dim: int | None, fingerprint: str | None, encoder: str = "",
                 index: str = "exact") -> None:
        """Open the gallery in ``db`` (a store's ``Database``, or a folder for a SQLite file), or create
        it there (then ``dim`` and ``fingerprint`` are required). Given for an existing gallery, they must
        be its own."""
        if index not in KINDS:
            raise ValueError(f"unknown index {index!r}; choose one of {list(KINDS)}")
        self._db: Database = SqliteDatabase(Path(db)) if isinstance(db, (str, Path)) else db
        self.name, self.folder, self.kind = self._db.name, self._db.folder, self._db.kind
        self._writing = threading.RLock()
        self._reading = threading.Lock()
        self._closed = False
        try:
            self._open(dim, fingerprint, encoder, index)
        except BaseException:
            self._db.close()
            raise
        self.rows = Rows(self._db, self.name, self.dim, self._check_open)

    def _open(self, dim: int | None, fingerprint: str | None, encoder: str, index: str) -> None:
        if not (self._db.created() and self._meta()):
            if dim is None or fingerprint is None:
                raise UnknownGallery(f"no gallery {self.name!r}; enroll a class into it to create it")
            # False when another process made it at the same moment: then it is theirs we open
            self._db.create({"dim": str(dim), "fingerprint": fingerprint, "encoder": encoder,
                             "version": "0", "index": index, "created": repr(time.time())})
        meta, self._memory = self._build(use_files=True)
        self._take_meta(meta)
        if (dim, fingerprint) != (None, None) and (self.dim != dim or self.fingerprint != fingerprint):
            raise FingerprintMismatch(
                f"gallery {self.name!r} holds {self.dim}-d vectors of encoder {self.encoder or '?'} "
                f"(fingerprint {self.fingerprint}); this encoder gives {dim}-d, fingerprint {fingerprint}. "
                "Re-embed into a new gallery to move encoders")
        self._take_in_files()

    def _meta(self) -> dict[str, str] | None:
        """The gallery's meta rows, None while it has none yet (being created)."""
        with self._db.read() as sql:
            stored = rows_.meta(sql)
        return stored if "dim" in stored else None

    def _take_meta(self, meta: dict[str, str]) -> None:
        self.dim, self.fingerprint = int(meta["dim"]), meta["fingerprint"]
        self.encoder, self.index_kind = meta.get("encoder", ""), meta.get("index", "exact")
        self.created = float(meta["created"]) if "created" in meta else None  # galleries made before it: None

    def _build(self, sql: Sql | None = None, use_files: bool = False) -> tuple[dict[str, str], Memory]:
        """(meta, memory) from the snapshot files when they match the database's version, else from its
        rows, page by page in one consistent view (``sql``'s, or a new one); takes no lock (the caller
        swaps it in)."""
        if sql is None:
            with self._db.snapshot() as sql:
                return self._build(sql, use_files)
        meta = rows_.meta(sql)
        dim, kind = int(meta["dim"]), meta.get("index", "exact")
        version, blobs = changelog.stored_version(sql), rows_.blobs(sql)
        if use_files and self.folder is not None:
            loaded = Memory.load(self.folder, dim, kind, version, rows_.labels(sql), blobs)
            if loaded is not None:
                return meta, loaded
        memory = Memory(dim, kind, version, blobs).fill(rows_.pages(sql, dim))
        if self.folder is not None:
            memory.save(self.folder)
        return meta, memory

    def _take_in_files(self) -> None:
        """Earlier versions kept the adapter as files beside the database: move them into it."""
        files = [name for name in LEGACY_BLOBS if self.folder is not None and (self.folder / name).is_file()]
        if files:
            self.set_blobs({name: (self.folder / name).read_bytes() for name in files})
            for name in files:
                (self.folder / name).unlink()

    def _check_open(self) -> None:
        if self._closed:
            raise GalleryClosed(f"gallery {self.name!r} was closed (evicted or shut down); open it again")

    # ------------------------------------------------------------ following other processes
    def follow(self, wait: bool = True) -> None:
        """Bring memory in line with what other processes committed. ``wait=False`` (queries): only if
        the store says something changed and no applier is at work here (one that is catches up itself)."""
        if self._closed or not self._writing.acquire(blocking=wait):
            return
        try:
            if self._closed or (not wait and not self._db.changed()):
                return
            if self._db.relocated():  # another process re-embedded it: everything is new
                self._swap(*self._build())
                return
            with self._db.snapshot() as sql:
                self._catch_up(sql)
        finally:
            self._writing.release()

    def _catch_up(self, sql: Sql) -> None:
        """Under ``_writing``: replay the log past memory's version (reload when it does not reach)."""
        steps = changelog.pending(sql, self._memory.version, self.dim)
        if steps is None:
            self._swap(*self._build(sql))
            return
        if steps:
            with self._reading:
                for version, change in steps:
                    self._memory.apply(change, version)

    def _swap(self, meta: dict[str, str], memory: Memory) -> None:
        """A new memory (and meta: a replaced gallery may hold another encoder's vectors) in one step."""
        with self._reading:
            self._take_meta(meta)
            self._memory = memory
            self.rows.dim = self.dim

    # ------------------------------------------------------------ writes
    @contextmanager
    def _write(self) -> Iterator[tuple[Sql, Changes, list[Step]]]:
        """One write transaction that also logs its change and bumps the version; rolled back on any
        error. Yields (sql, changes, after): the steps put in ``after`` change memory once COMMIT has
        succeeded, so memory never shows what the database does not hold. (A commit whose answer was
        lost is not applied here either; the log brings it in on the next catch-up.)"""
        self._check_open()
        deadline = time.monotonic() + WRITE_WAIT
        if not self._writing.acquire(timeout=WRITE_WAIT):
            raise StoreUnavailable(f"gallery {self.name!r} is busy with another write; retry in a moment")
        try:
            self._check_open()
            with self._db.write(wait=max(0.05, deadline - time.monotonic())) as sql:
                self._catch_up(sql)  # what other processes committed comes first
                changes, after = Changes(), []
                yield sql, changes, after
                version = self._memory.version + 1
                changelog.record(sql, version, changes)
            with self._reading:
                self._memory.apply(after, version)
        finally:
            self._writing.release()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """This process's writes to the gallery wait until the block ends (re-embedding's final swap);
        queries go on."""
        with self._writing:
            self._check_open()
            yield

    def set_version(self, version: int) -> None:
        """Jump to ``version`` (a rebuilt gallery taking over from an older one); the change log
        restarts there with a reset, so anything following it reloads."""
        with self._writing:
            with self._db.write() as sql:
                changelog.restart(sql, version)
            with self._reading:  # once committed, as every change to memory
                self._memory.version = int(version)

    def replace_with(self, other: "Gallery") -> None:
        """Become ``other`` (a replacement built in the store's ``scratch`` place, at this gallery's
        version + 1) in one step: queries see the old gallery until it returns, then the new one;
        ``other`` is closed. The snapshot files go (they belong to the old vectors). Raises
        ``ChangedMeanwhile`` (nothing changed) if another process wrote since this one last caught up:
        follow and try again."""
        with self._writing, other._writing:
            self._check_open()
            other._check_open()
            self._db.take_over(other._db, self._memory.version)
            other._closed = True
            if self.folder is not None:
                for name in SNAPSHOT_FILES:
                    (self.folder / name).unlink(missing_ok=True)
            self._swap(*self._build())

    # ------------------------------------------------------------ queries: memory only
    @contextmanager
    def _view(self) -> Iterator[Memory]:
        """Memory as it is now, for in-memory work only (after taking in others' commits if nobody is)."""
        self._check_open()
        self.follow(wait=False)
        with self._reading:
            self._check_open()
            yield self._memory

    @property
    def version(self) -> int:
        """Increases with every committed change: a key for caches derived from the gallery."""
        with self._view() as memory:
            return memory.version

    def __len__(self) -> int:
        return len(self._memory) if not self._closed else 0

    def count(self, label: str) -> int:
        """Examples of ``label`` (0 if it is not enrolled), from memory."""
        label = check_label(label)
        with self._view() as memory:
            return memory.counts.get(label, 0)

    def check_fingerprint(self, fingerprint: str | None) -> None:
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise FingerprintMismatch(f"vectors come from encoder fingerprint {fingerprint}; gallery {self.name!r} "
                                      f"holds {self.fingerprint}. Re-embed, never mix")

    def lookup(self, queries: np.ndarray, neighbours: int = 0, fingerprint: str | None = None) -> Lookup:
        """Prototype cosines and the ``neighbours`` nearest examples of each query, from one version.
        ``fingerprint``: the encoder the queries come from, checked in the same view (a gallery
        re-embedded meanwhile refuses them rather than compare across encoders)."""
        m = check_k(neighbours, low=0)
        with self._view() as memory:
            self.check_fingerprint(fingerprint)
            x = check_vectors(queries, self.dim)
            if len(memory) == 0:
                raise EmptyGallery(f"gallery {self.name!r} is empty; enroll at least one image first")
            return memory.lookup(x, m)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        """(n, dim) -> scores (n, k'), ids (n, k'), labels per row; k' = min(k, examples)."""
        k = check_k(k)
        with self._view() as memory:
            x = check_vectors(queries, self.dim)
            if len(memory) == 0:
                raise EmptyGallery(f"gallery {self.name!r} is empty; enroll at least one image first")
            return memory.search(x, k)

    def versioned_vectors(self) -> tuple[int, np.ndarray, list[str]]:
        """(version, vectors, labels) copied in one view: a consistent snapshot to work on outside it."""
        with self._view() as memory:
            vectors, _, labels = memory.vectors()
            return memory.version, vectors, labels

    def vectors(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Every example: (vectors (n, dim), ids (n,), labels), for the few-shot heads."""
        with self._view() as memory:
            return memory.vectors()

    def labels_by_id(self) -> dict[int, str]:
        with self._view() as memory:
            return dict(memory.labels)

    def blobs(self) -> tuple[int, dict[str, bytes]]:
        """(the version at which the named blobs last changed, the blobs), from memory."""
        with self._view() as memory:
            return memory.blobs_version, dict(memory.blobs)

    # ------------------------------------------------------------ closing
    def save(self) -> None:
        """Write the snapshot files (SQLite only) so the next open skips the build."""
        if self.folder is None:
            return
        with self._writing:  # every change to memory holds it: queries go on meanwhile
            self._check_open()
            self._memory.save(self.folder)

    def close(self) -> None:
        """Save the snapshot and close the database; later calls raise GalleryClosed. Idempotent."""
        with self._writing:
            if self._closed:
                return
            try:
                self.save()
            finally:
                self._db.close()
                self._closed = True

