"""The change log of a gallery: every write records its version and what it changed (table
``changes``), so every other process holding the gallery brings its memory in line by replaying
what came after its own version, instead of reloading everything.

An entry names ids and labels only (a batch insert logs two numbers, not ten thousand vectors); its
rows are read back as they are now, so later entries, replayed too, leave memory equal to the
database. A follower further behind than the log reaches (``KEEP_CHANGES`` versions), or past a
``reset``, reloads everything.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from .memory import Step
from .stores import Sql

KEEP_CHANGES = 10_000  # versions kept in the log
PRUNE_EVERY = 1000
CHUNK = 900  # ids per IN (...): SQLite binds at most 999 parameters


class Changes:
    """What one write changes, as it goes; written with the write's version at its end."""

    def __init__(self) -> None:
        self.ops: list[dict] = []

    def log(self, op: str, ids: Sequence[int] = (), **fields) -> None:
        self.ops.append({"op": op, "ids": id_runs(ids), **fields})


def id_runs(ids: Sequence[int]) -> list[list[int]]:
    """Example ids as [low, high] runs."""
    runs: list[list[int]] = []
    for i in sorted(int(i) for i in ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


def _ids(runs: list[list[int]]) -> list[int]:
    return [i for low, high in runs for i in range(low, high + 1)]


def stored_version(sql: Sql) -> int:
    return int(sql.execute("SELECT value FROM meta WHERE key='version'").fetchone()[0])


def record(sql: Sql, version: int, changes: Changes) -> None:
    """Inside the write's transaction: the gallery is now at ``version``, and this is what changed."""
    sql.execute("UPDATE meta SET value=? WHERE key='version'", (str(version),))
    sql.execute("INSERT INTO changes (version, ops) VALUES (?, ?)", (version, json.dumps(changes.ops)))
    if version % PRUNE_EVERY == 0:
        sql.execute("DELETE FROM changes WHERE version <= ?", (version - KEEP_CHANGES,))


def restart(sql: Sql, version: int) -> None:
    """Jump to ``version`` with a log that holds only a reset: whoever follows reloads everything."""
    sql.execute("UPDATE meta SET value=? WHERE key='version'", (str(int(version)),))
    sql.execute("DELETE FROM changes")
    sql.execute("INSERT INTO changes (version, ops) VALUES (?, ?)", (int(version), json.dumps([{"op": "reset"}])))


def pending(sql: Sql, applied: int, dim: int) -> list[tuple[int, list[Step]]] | None:
    """The steps of every version after ``applied`` (empty when there is none), read in ``sql``'s view;
    None when they cannot be replayed and everything must be reloaded."""
    stored = stored_version(sql)
    if stored == applied:
        return []
    rows = sql.execute("SELECT version, ops FROM changes WHERE version > ? ORDER BY version", (applied,)).fetchall()
    if stored < applied or not rows or rows[0][0] != applied + 1 or rows[-1][0] != stored:
        return None
    out = []
    for version, ops in rows:
        steps = [_step(sql, op, dim) for op in json.loads(ops)]
        if any(step is None for step in steps):
            return None
        out.append((version, steps))
    return out


def _step(sql: Sql, op: dict, dim: int) -> Step | None:
    kind = op["op"]
    if kind == "reset":
        return None
    if kind == "blobs":
        marks = ",".join("?" * len(op["names"]))
        stored = dict(sql.execute(f"SELECT name, data FROM blobs WHERE name IN ({marks})", op["names"]).fetchall())
        return Step("blobs", blobs={name: bytes(stored[name]) if name in stored else None for name in op["names"]})
    if kind == "add":
        rows = [row for low, high in op["ids"] for row in
                sql.execute("SELECT id, label, vector FROM examples WHERE id BETWEEN ? AND ? ORDER BY id",
                            (low, high)).fetchall()]
        x = np.frombuffer(b"".join(r[2] for r in rows), np.float32).reshape(len(rows), dim)
        return Step("add", ids=[r[0] for r in rows], vectors=x, labels=[r[1] for r in rows])
    if kind == "remove":
        return Step("remove", ids=_ids(op["ids"]))
    if kind == "rename":
        return Step("rename", rename=(op["label"], op["new_label"]))
    if kind == "relabel":
        ids, labels = _ids(op["ids"]), {}
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            marks = ",".join("?" * len(chunk))
            labels.update(sql.execute(f"SELECT id, label FROM examples WHERE id IN ({marks})", chunk).fetchall())
        return Step("relabel", labels={i: labels.get(i) for i in ids})
    raise ValueError(f"unknown change {kind!r} in the gallery's log")
