"""Read-only queries of a gallery's database: its meta, classes, examples and kept images. Each read
sees the latest committed state and takes no gallery lock, so a write waiting on the database holds
none of these up (and none of them holds up a query, which reads memory only)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .errors import InvalidArgument, UnknownExample, UnknownLabel
from .stores import Database, Sql
from .validate import check_id, check_label

IMAGE_KINDS = ("thumbnail", "original")
PAGE = 8192  # rows per page when memory is built from the database


@dataclass
class ClassInfo:
    label: str
    count: int
    ids: list[int]
    created: float


def meta(sql: Sql) -> dict[str, str]:
    return dict(sql.execute("SELECT key, value FROM meta").fetchall())


def blobs(sql: Sql) -> dict[str, bytes]:
    return {name: bytes(data) for name, data in sql.execute("SELECT name, data FROM blobs").fetchall()}


def labels(sql: Sql) -> dict[int, str]:
    return dict(sql.execute("SELECT id, label FROM examples").fetchall())


def pages(sql: Sql, dim: int) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
    """Every example as (ids, labels, vectors) pages in id order, within ``sql``'s view."""
    after = -1
    while rows := sql.execute("SELECT id, label, vector FROM examples WHERE id > ? ORDER BY id LIMIT ?",
                              (after, PAGE)).fetchall():
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        yield ids, [r[1] for r in rows], np.frombuffer(b"".join(r[2] for r in rows), np.float32).reshape(len(rows), dim)
        after = int(ids[-1])


class Rows:
    """The read-only queries of one open gallery (``Gallery.rows``)."""

    def __init__(self, db: Database, name: str, dim: int, check_open: Callable[[], None]) -> None:
        self._db, self.name, self.dim, self._check_open = db, name, dim, check_open

    def _read(self):
        self._check_open()
        return self._db.read()

    def classes(self) -> list[tuple[str, int]]:
        """(label, example count), sorted by label (here: databases collate text differently)."""
        with self._read() as sql:
            return sorted((r[0], r[1]) for r in sql.execute("SELECT label, COUNT(*) FROM examples GROUP BY label"))

    def get_class(self, label: str, offset: int = 0, limit: int | None = None) -> ClassInfo:
        """A class: its count, when its first example came, and its example ids (``limit`` of them from
        ``offset``, in id order; all by default)."""
        label = check_label(label)
        with self._read() as sql:
            count, created = sql.execute("SELECT COUNT(*), MIN(created) FROM examples WHERE label=?", (label,)).fetchone()
            if not count:
                raise UnknownLabel(f"no class {label!r} in gallery {self.name!r}")
            ids = [r[0] for r in sql.execute("SELECT id FROM examples WHERE label=? ORDER BY id LIMIT ? OFFSET ?",
                                             (label, count if limit is None else limit, offset))]
        return ClassInfo(label, count, ids, created)

    def image(self, example_id: int, kind: str = "original") -> tuple[bytes, str]:
        """(bytes, media type) of what was kept of an example's image; UnknownExample if nothing was."""
        if kind not in IMAGE_KINDS:
            raise InvalidArgument(f"image kind must be one of {list(IMAGE_KINDS)}, got {kind!r}")
        example_id = check_id(example_id, self.name)
        with self._read() as sql:
            if sql.execute("SELECT 1 FROM examples WHERE id=?", (example_id,)).fetchone() is None:
                raise UnknownExample(f"no example {example_id} in gallery {self.name!r}")
            row = sql.execute(f"SELECT {kind}, media_type FROM images WHERE id=?", (example_id,)).fetchone()
        if row is None or row[0] is None:
            raise UnknownExample(f"example {example_id} of gallery {self.name!r} has no {kind} image: it was "
                                 "enrolled while images were not kept (FEWSHOT_KEEP_IMAGES)")
        return bytes(row[0]), ("image/jpeg" if kind == "thumbnail" else row[1] or "application/octet-stream")

    def meta_value(self, key: str) -> str | None:
        with self._read() as sql:
            row = sql.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def examples(self, after_id: int = -1, limit: int = PAGE) -> tuple[list[dict], np.ndarray]:
        """Examples with ids above ``after_id`` in id order: (rows with id, label, metadata; vectors)."""
        with self._read() as sql:
            rows = sql.execute("SELECT id, label, metadata, vector FROM examples WHERE id > ? ORDER BY id "
                               "LIMIT ?", (after_id, limit)).fetchall()
        x = np.frombuffer(b"".join(r[3] for r in rows), np.float32).reshape(len(rows), self.dim)
        return [{"id": r[0], "label": r[1], "metadata": json.loads(r[2]) if r[2] else None} for r in rows], x

    def kept(self, after_id: int = -1, limit: int = 256, vectors: bool = False) -> list[dict]:
        """Examples with ids above ``after_id``, in id order, with what was kept of their images (and
        each one's stored ``vector`` bytes if asked)."""
        with self._read() as sql:
            cursor = sql.execute(
                "SELECT e.id, e.label, e.sha256, e.created, e.metadata, i.thumbnail, i.original, i.media_type"
                + (", e.vector" if vectors else "") +
                " FROM examples e LEFT JOIN images i ON i.id = e.id WHERE e.id > ? ORDER BY e.id LIMIT ?",
                (after_id, limit))
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]
