"""What a gallery keeps in memory, derived from its database: the vector index, each example's label,
the per-class sums behind the prototypes, and the named blobs. No SQL and no lock here: ``Gallery``
decides who may change it and when (only after COMMIT, one applier at a time, readers under a short
lock that no thread waiting on the database ever holds).

Changes arrive as *steps* (``Step``): what a write did, or what another process's write did as the
change log tells it. Every step is tolerant (adding an id already here, removing one that is not),
so replaying rows read "as they are now" leaves memory equal to the database.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .files import write_atomic
from .heads import normalize
from .index import VectorIndex

SNAPSHOT_FILES = ("index.faiss", "index.faiss.fp16", "index.json")


@dataclass
class Lookup:
    """One consistent view of a gallery for a batch of queries."""
    version: int
    names: list[str]  # class names, sorted: the columns of proto_scores
    proto_scores: np.ndarray  # (q, C) cosine to each class prototype
    sims: np.ndarray  # (q, m) cosines of the m nearest examples, descending
    classes: np.ndarray  # (q, m) their class numbers (columns of proto_scores); -1 for none


@dataclass
class Step:
    """One change to memory. ``kind``: add (vectors, ids, labels), remove (ids), relabel (labels: id ->
    new label, None when the example is gone), rename (old -> new), blobs (name -> bytes or None)."""
    kind: str
    ids: Sequence[int] = ()
    vectors: np.ndarray | None = None
    labels: Sequence[str] | dict | None = None
    rename: tuple[str, str] | None = None
    blobs: dict | None = None


class Memory:
    def __init__(self, dim: int, kind: str, version: int = 0, blobs: dict[str, bytes] | None = None) -> None:
        self.dim, self.kind, self.version = dim, kind, version
        self.index = VectorIndex(dim, kind)
        self.labels: dict[int, str] = {}
        self.blobs: dict[str, bytes] = dict(blobs or {})
        self.blobs_version = version
        self._sums: dict[str, np.ndarray] = {}  # per class: float64 sum of its unit vectors
        self.counts: dict[str, int] = {}
        self._table: tuple | None = None  # (version, prototypes (C, d), names, column of each name)
        self._touched: set[str] | None = set()  # classes changed since the table was built; None: rebuild

    # ------------------------------------------------------------ building
    def fill(self, pages: Iterable[tuple[np.ndarray, list[str], np.ndarray]]) -> "Memory":
        """Add (ids, labels, vectors) pages, as read from the database."""
        for ids, labels, vectors in pages:
            self._add(vectors, ids, labels)
        return self

    @classmethod
    def load(cls, folder: Path, dim: int, kind: str, version: int, labels: dict[int, str],
             blobs: dict[str, bytes]) -> "Memory | None":
        """The snapshot files in ``folder`` if they were written at ``version`` for these labels, else None."""
        info = folder / "index.json"
        if not (info.is_file() and (folder / "index.faiss").is_file()):
            return None
        meta = json.loads(info.read_text())
        if (meta.get("version"), meta.get("count"), meta.get("index")) != (version, len(labels), kind):
            return None
        memory = cls(dim, kind, version, blobs)
        memory.index = VectorIndex.load(folder / "index.faiss", dim, kind)
        if len(memory.index) != len(labels):
            return None
        memory.labels = labels
        vectors, ids = memory.index.all_vectors()
        memory._count(vectors, [labels[int(i)] for i in ids], +1)
        return memory

    def save(self, folder: Path) -> None:
        """Write the snapshot files (each atomically) so the next open skips the build."""
        self.index.save(folder / "index.faiss")
        write_atomic(folder / "index.json", json.dumps({"version": self.version, "count": len(self.index),
                                                        "index": self.kind}))

    # ------------------------------------------------------------ changing
    def apply(self, steps: Iterable[Step], version: int) -> None:
        """Steps of one committed version, in order; then memory is at ``version``."""
        for step in steps:
            if step.kind == "add":
                self._add(step.vectors, step.ids, step.labels)
            elif step.kind == "remove":
                self._remove([i for i in step.ids if i in self.labels])
            elif step.kind == "relabel":
                self._relabel(step.labels)
            elif step.kind == "rename":
                old, new = step.rename
                self._relabel({i: new for i, label in self.labels.items() if label == old})
            elif step.kind == "blobs":
                for name, data in step.blobs.items():
                    if data is None:
                        self.blobs.pop(name, None)
                    else:
                        self.blobs[name] = bytes(data)
                self.blobs_version = version
            else:
                raise ValueError(f"unknown step {step.kind!r}")
        self.version = version

    def _add(self, vectors: np.ndarray, ids: Sequence[int], labels: Sequence[str]) -> None:
        fresh = [j for j, i in enumerate(ids) if int(i) not in self.labels]
        if not fresh:
            return
        x = np.ascontiguousarray(vectors[fresh], dtype=np.float32)
        new_ids = [int(ids[j]) for j in fresh]
        new_labels = [labels[j] for j in fresh]
        self.index.add(x, np.asarray(new_ids, dtype=np.int64))
        self.labels.update(zip(new_ids, new_labels))
        self._count(x, new_labels, +1)

    def _remove(self, ids: list[int]) -> None:
        if not ids:
            return
        self._count(self.index.vectors_of(ids), [self.labels[i] for i in ids], -1)
        self.index.remove(ids)
        for i in ids:
            del self.labels[i]

    def _relabel(self, labels: dict[int, str | None]) -> None:
        """Move examples to other classes; None: the example is gone from the database."""
        moving = {i: label for i, label in labels.items() if i in self.labels and label != self.labels[i]}
        self._remove([i for i, label in moving.items() if label is None])
        moving = {i: label for i, label in moving.items() if label is not None}
        if not moving:
            return
        ids = list(moving)
        x = self.index.vectors_of(ids)
        self._count(x, [self.labels[i] for i in ids], -1)
        self.labels.update(moving)
        self._count(x, list(moving.values()), +1)

    def _count(self, vectors: np.ndarray, labels: Sequence[str], sign: int) -> None:
        """Keep the per-class sums (prototypes without a scan) in step with examples added or removed."""
        for row, label in zip(vectors, labels):
            count = self.counts.get(label, 0) + sign
            if self._touched is not None:
                self._touched.add(label)
            if count <= 0 or label not in self.counts:  # a class comes or goes: the table is rebuilt
                self._touched = None
            if count <= 0:
                self.counts.pop(label, None)
                self._sums.pop(label, None)
                continue
            self.counts[label] = count
            self._sums[label] = self._sums.get(label, 0.0) + sign * row.astype(np.float64)

    # ------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.index)

    def _class_table(self) -> tuple[np.ndarray, list[str], dict[str, int]]:
        """(prototypes (C, d), sorted names, column of each name) for this version, kept until it changes."""
        if self._table is not None and self._table[0] == self.version:
            return self._table[1:]
        if self._table is not None and self._touched is not None:  # same classes: renew changed rows only
            _, protos, names, column = self._table
            for label in self._touched:
                protos[column[label]] = normalize(self._sums[label])
        else:
            names = sorted(self._sums)
            protos = normalize(np.stack([self._sums[n] for n in names])) if names else \
                np.zeros((0, self.dim), np.float32)
            column = {n: j for j, n in enumerate(names)}
        self._table, self._touched = (self.version, protos, names, column), set()
        return protos, names, column

    def lookup(self, x: np.ndarray, neighbours: int) -> Lookup:
        """Prototype cosines and the ``neighbours`` nearest examples of each row of ``x`` (unit, checked)."""
        protos, names, column = self._class_table()
        if neighbours:
            sims, ids = self.index.search(x, neighbours)
        else:
            sims = ids = np.zeros((len(x), 0), np.float32)
        classes = np.array([[column[self.labels[int(i)]] if i != -1 else -1 for i in row] for row in ids],
                           np.int64).reshape(sims.shape)
        return Lookup(self.version, names, x @ protos.T, sims, classes)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        scores, ids = self.index.search(x, k)
        return scores, ids, [[self.labels[int(i)] for i in row if i != -1] for row in ids]

    def vectors(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Every example: (vectors (n, dim), ids (n,), labels), copies."""
        vectors, ids = self.index.all_vectors()
        return vectors, ids, [self.labels[int(i)] for i in ids]
