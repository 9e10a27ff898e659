"""Galleries as SQLite files: ``<data_dir>/<name>/gallery.sqlite`` (WAL, synchronous=FULL: a write
that returned is on disk), beside the derived index snapshot the gallery keeps there."""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from ..errors import GalleryClosed

GALLERY_FILE = "gallery.sqlite"
NEXT_DB = "gallery.next.sqlite"  # a re-embedded database waiting to be swapped in
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    label TEXT NOT NULL,
    vector BLOB NOT NULL,
    fingerprint TEXT NOT NULL,
    sha256 TEXT,
    created REAL NOT NULL,
    metadata TEXT
);
CREATE INDEX IF NOT EXISTS examples_label ON examples(label);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    thumbnail BLOB,
    original BLOB,
    media_type TEXT
);
CREATE TABLE IF NOT EXISTS changes (version INTEGER PRIMARY KEY, ops TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (name TEXT PRIMARY KEY, data BLOB NOT NULL);
"""


class SqliteSql:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, params: Sequence = ()):
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence]) -> None:
        self._db.executemany(sql, rows)

    def insert_ids(self, sql: str, rows: Sequence[Sequence]) -> list[int]:
        return [self._db.execute(sql + " RETURNING id", row).fetchone()[0] for row in rows]

    def ids_taken(self) -> None:  # AUTOINCREMENT already continues above the largest id
        pass


class SqliteDatabase:
    """One gallery's file: one connection, used by one thread at a time (its lock); BEGIN IMMEDIATE
    serialises writers across processes."""

    kind = "sqlite"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.name = self.folder.name
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / NEXT_DB).unlink(missing_ok=True)  # a re-embedding that did not finish
        self._lock = threading.RLock()
        self._closed = False
        self._db = self._connect()
        self._sql = SqliteSql(self._db)
        self._seen = self._data_version()

    @contextmanager
    def _held(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise GalleryClosed(f"gallery {self.name!r} was closed (evicted or shut down); open it again")
            yield

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.folder / GALLERY_FILE, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        return db

    def _data_version(self) -> int:
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    @contextmanager
    def read(self) -> Iterator[SqliteSql]:
        with self._held():
            yield self._sql

    @contextmanager
    def snapshot(self) -> Iterator[SqliteSql]:
        with self._held():
            if self._db.in_transaction:  # inside our own write: it already is one view
                yield self._sql
                return
            self._db.execute("BEGIN")
            try:
                self._db.execute("SELECT 1 FROM meta LIMIT 1")  # WAL: the view is fixed at the first read
                self._seen = self._data_version()
                yield self._sql
            finally:
                self._db.execute("ROLLBACK")

    @contextmanager
    def write(self) -> Iterator[SqliteSql]:
        with self._held():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._sql
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def created(self) -> bool:
        with self.read() as sql:
            return sql.execute("SELECT 1 FROM meta LIMIT 1").fetchone() is not None

    def create(self, meta: dict[str, str]) -> bool:
        with self.write() as sql:
            if sql.execute("SELECT 1 FROM meta LIMIT 1").fetchone():
                return False
            sql.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        return True

    def changed(self) -> bool:
        with self._held():
            if self._db.in_transaction:  # inside our own write: it caught up when it began
                return False
            seen = self._data_version()
            if seen == self._seen:
                return False
            self._seen = seen
            return True

    def relocated(self) -> bool:
        return False  # a replaced file is swapped in under this process's lock (take_over)

    def take_over(self, other: "SqliteDatabase", version: int) -> None:
        """Swap in the finished database file of ``other`` in one step (``other`` is closed)."""
        other.close()
        with self._lock:
            built = self.folder / NEXT_DB
            (other.folder / GALLERY_FILE).replace(built)
            self._swap(built)

    def _swap(self, built: Path) -> None:
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()  # the last connection: SQLite removes the old WAL, which must not meet the new file
        os.replace(built, self.folder / GALLERY_FILE)
        directory = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self._db = self._connect()
        self._sql = SqliteSql(self._db)
        self._seen = self._data_version()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()


class SqliteHome:
    """Galleries as folders of a data directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.location = str(self.root)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if _NAME.fullmatch(p.name) and (p / GALLERY_FILE).is_file())

    def exists(self, name: str) -> bool:
        return (self.root / name / GALLERY_FILE).is_file()

    def describe(self, name: str) -> dict | None:
        path = self.root / name / GALLERY_FILE
        if not path.is_file():
            return None
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError:  # created, tables not yet
            return None
        finally:
            db.close()

    def open(self, name: str) -> SqliteDatabase:
        return SqliteDatabase(self.root / name)

    def scratch(self, name: str) -> SqliteDatabase:
        work = self.root / f".{name}.reembed"  # not a gallery name: never listed
        shutil.rmtree(work, ignore_errors=True)
        return SqliteDatabase(work)

    def discard(self, db: SqliteDatabase) -> None:
        shutil.rmtree(db.folder, ignore_errors=True)

    def follow(self, changed: Callable[[str], None], everything: Callable[[], None]) -> None:
        pass  # reads check PRAGMA data_version themselves

    def close(self) -> None:
        pass


