"""Galleries as SQLite files: ``<data_dir>/<name>/gallery.sqlite`` (WAL, synchronous=FULL: a write
that returned is on disk), beside the derived index snapshot the gallery keeps there.

Two connections per gallery: one writes, one reads. In WAL mode readers never wait on a writer, so
listing classes or catching up goes on while a write waits for another process's lock. The tables
come from ``schema`` (the migrations both stores share); ``PRAGMA user_version`` says how far a file
got, and a file from before versioning (its tables there, version 0) is marked as what it holds."""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from ..errors import GalleryClosed
from .schema import LATEST, statements

GALLERY_FILE = "gallery.sqlite"
NEXT_DB = "gallery.next.sqlite"  # a re-embedded database waiting to be swapped in
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

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
    """One gallery's file: a writer and a reader connection, each used by one thread at a time (its
    lock); BEGIN IMMEDIATE serialises writers across processes."""

    kind = "sqlite"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.name = self.folder.name
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / NEXT_DB).unlink(missing_ok=True)  # a re-embedding that did not finish
        self._lock = threading.RLock()  # the writer
        self._read_lock = threading.RLock()
        self._closed = False
        self._connect()

    def _connect(self) -> None:
        self._db = _open(self.folder / GALLERY_FILE)
        migrate(self._db)
        self._reader = _open(self.folder / GALLERY_FILE)
        self._sql, self._read_sql = SqliteSql(self._db), SqliteSql(self._reader)
        self._seen = self._data_version()

    @contextmanager
    def _held(self, lock) -> Iterator[None]:
        with lock:
            if self._closed:
                raise GalleryClosed(f"gallery {self.name!r} was closed (evicted or shut down); open it again")
            yield

    def _data_version(self) -> int:
        return self._reader.execute("PRAGMA data_version").fetchone()[0]

    @contextmanager
    def read(self) -> Iterator[SqliteSql]:
        with self._held(self._read_lock):
            yield self._read_sql

    @contextmanager
    def snapshot(self) -> Iterator[SqliteSql]:
        """One consistent view, on the reader (inside a write of ours it sees what the writer does:
        nobody else can commit meanwhile)."""
        with self._held(self._read_lock):
            self._reader.execute("BEGIN")
            try:
                self._reader.execute("SELECT 1 FROM meta LIMIT 1")  # WAL: the view is fixed at the first read
                self._seen = self._data_version()
                yield self._read_sql
            finally:
                self._reader.execute("ROLLBACK")

    @contextmanager
    def write(self, wait: float | None = None) -> Iterator[SqliteSql]:  # local: no connection to wait for
        with self._held(self._lock):
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
        """Has any connection (another process's, or our writer) committed since we last looked?"""
        with self._held(self._read_lock):
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
        with self._lock, self._read_lock:
            built = self.folder / NEXT_DB
            (other.folder / GALLERY_FILE).replace(built)
            self._swap(built)

    def _swap(self, built: Path) -> None:
        self._reader.close()
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()  # the last connection: SQLite removes the old WAL, which must not meet the new file
        os.replace(built, self.folder / GALLERY_FILE)
        _fsync_dir(self.folder)
        self._connect()

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._closed = True
            self._reader.close()
            self._db.close()


def _open(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def migrate(db: sqlite3.Connection) -> None:
    """Bring the file's tables to the newest migration, in one transaction (idempotent)."""
    if db.execute("PRAGMA user_version").fetchone()[0] >= LATEST:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        at = db.execute("PRAGMA user_version").fetchone()[0]  # again: another process may have just done it
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if at == 0 and "meta" in tables:  # made before versioning: the tables say how far it got
            at = 2 if "blobs" in tables else 1
        for version, _, listed in statements("sqlite", at):
            for statement in listed:
                db.execute(statement)
            at = version
        db.execute(f"PRAGMA user_version = {int(at)}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class SqliteHome:
    """Galleries as folders of a data directory. Hidden folders (``.NAME.reembed``: a re-embedding being
    built; ``.NAME.deleted.*``: a gallery being deleted) are never listed; at start, those that no
    running process holds are removed."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.location = str(self.root)
        self.sweep()

    def sweep(self) -> None:
        """Remove what a stopped deletion or re-embedding left behind (not one another process is building)."""
        for path in self.root.glob(".*"):
            if path.is_dir() and (".deleted." in path.name or path.name.endswith(".reembed") and not _held(path)):
                shutil.rmtree(path, ignore_errors=True)

    def delete(self, name: str) -> bool:
        """Remove gallery ``name``: first renamed out of sight in one step (a crash after it leaves only a
        hidden folder, removed at the next start), then removed. False if there is no such gallery."""
        folder = self.root / name
        if not (folder / GALLERY_FILE).is_file():
            return False
        gone = self.root / f".{name}.deleted.{uuid.uuid4().hex[:8]}"
        folder.rename(gone)
        _fsync_dir(self.root)
        shutil.rmtree(gone, ignore_errors=True)
        return True

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
        db = SqliteDatabase(work)
        db.hold = _hold(work)  # while this process builds it, a sweep elsewhere leaves it alone
        return db

    def discard(self, db: SqliteDatabase) -> None:
        shutil.rmtree(db.folder, ignore_errors=True)
        hold = getattr(db, "hold", None)
        if hold is not None:
            hold.close()

    def follow(self, changed: Callable[[str], None], everything: Callable[[], None]) -> None:
        pass  # reads check PRAGMA data_version themselves

    def close(self) -> None:
        pass


def _fsync_dir(path: Path) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


HOLD_FILE = "building"


def _hold(folder: Path):
    """An exclusive lock on ``folder`` (flock on a file in it) for as long as the returned file is open."""
    handle = open(folder / HOLD_FILE, "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _held(folder: Path) -> bool:
    """Does a running process hold ``folder`` (``_hold``)? A lock dies with its process."""
    try:
        with open(folder / HOLD_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False
