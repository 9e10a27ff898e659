"""What each write of a gallery does in its database, and to memory once it has committed. A mixin of
``Gallery``, which gives each one its transaction (``_write``: the change log, the version, the
locks): here is only the SQL of the write and the ``Step`` memory takes after COMMIT."""
from __future__ import annotations

import json
import time
from typing import Sequence

import numpy as np

from .changelog import Changes
from .errors import LabelExists, UnknownExample, UnknownLabel
from .images import KeptImage
from .memory import Step
from .stores import Sql
from .validate import check_id, check_label, check_vectors, same_length


class Writes:
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
        kept = list(images) if images is not None else [None] * len(x)
        same_length(len(hashes), len(x), "sha256 values")
        same_length(len(kept), len(x), "kept images")
        meta_json = json.dumps(metadata) if metadata is not None else None
        with self._write() as (db, changes, after):
            exists = db.execute("SELECT 1 FROM examples WHERE label=? LIMIT 1", (label,)).fetchone() is not None
            if create is True and exists:
                raise LabelExists(f"class {label!r} already exists; add examples to it instead")
            if create is False and not exists:
                raise UnknownLabel(f"no class {label!r} in gallery {self.name!r}; enroll it first")
            rows = [{"label": label, "sha256": h, "created": time.time(), "metadata": meta_json,
                     **_image_fields(k)} for h, k in zip(hashes, kept)]
            return self._insert(db, changes, after, rows, x)

    def add_many(self, labels: Sequence[str], vectors: np.ndarray, metadata: Sequence[dict | None] | None = None,
                 mark: tuple[str, str] | None = None) -> list[int]:
        """Examples of any classes in one transaction (bulk import). ``mark``: a (key, value) stored in
        the gallery's meta in the same transaction, e.g. how far an import got."""
        labels = [check_label(label) for label in labels]
        x = check_vectors(vectors, self.dim) if labels else np.zeros((0, self.dim), np.float32)
        same_length(len(labels), len(x), "labels")
        metas = [json.dumps(m) if m is not None else None for m in (metadata or [None] * len(x))]
        now = time.time()
        with self._write() as (db, changes, after):
            if mark is not None:
                db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                           "ON CONFLICT (key) DO UPDATE SET value = excluded.value", mark)
            rows = [{"label": label, "sha256": None, "created": now, "metadata": m, **_image_fields(None)}
                    for label, m in zip(labels, metas)]
            return self._insert(db, changes, after, rows, x)

    def import_rows(self, rows: Sequence[dict], vectors: np.ndarray) -> None:
        """Add examples with their own ids (``rows`` as from ``rows.kept``, one vector each): a gallery
        being rebuilt from another one keeps its ids, labels, times and images."""
        x = check_vectors(vectors, self.dim, keep_unit=True) if len(rows) else np.zeros((0, self.dim), np.float32)
        same_length(len(rows), len(x), "rows")
        if len(rows):
            with self._write() as (db, changes, after):
                self._insert(db, changes, after, rows, x, own_ids=True)

    def _insert(self, db: Sql, changes: Changes, after: list[Step], rows: Sequence[dict], x: np.ndarray,
                own_ids: bool = False) -> list[int]:
        """Inside a write: examples (label, sha256, created, metadata, the kept image's fields; ``id``
        too when ``own_ids``) with their vectors; their ids."""
        values = [(r["label"], v.tobytes(), self.fingerprint, r["sha256"], r["created"], r["metadata"])
                  for r, v in zip(rows, x)]
        columns = "label, vector, fingerprint, sha256, created, metadata"
        if own_ids:
            ids = [r["id"] for r in rows]
            db.executemany(f"INSERT INTO examples (id, {columns}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(i, *v) for i, v in zip(ids, values)])
            db.ids_taken()
        else:
            ids = db.insert_ids(f"INSERT INTO examples ({columns}) VALUES (?, ?, ?, ?, ?, ?)", values)
        db.executemany("INSERT INTO images (id, thumbnail, original, media_type) VALUES (?, ?, ?, ?)",
                       [(i, r["thumbnail"], r["original"], r["media_type"]) for i, r in zip(ids, rows)
                        if r["thumbnail"] is not None or r["original"] is not None])
        changes.log("add", ids)
        after.append(Step("add", ids, x, [r["label"] for r in rows]))
        return ids

    def relabel_example(self, example_id: int, label: str) -> None:
        """Move one example to another class (the class need not exist)."""
        label = check_label(label)
        example_id = check_id(example_id, self.name)
        with self._write() as (db, changes, after):
            if db.execute("SELECT 1 FROM examples WHERE id=?", (example_id,)).fetchone() is None:
                raise UnknownExample(f"no example {example_id} in gallery {self.name!r}")
            db.execute("UPDATE examples SET label=? WHERE id=?", (label, example_id))
            changes.log("relabel", [example_id])
            after.append(Step("relabel", labels={example_id: label}))

    def remove_example(self, example_id: int) -> str:
        """Remove one example; returns its label. Removing a class's last example removes the class."""
        example_id = check_id(example_id, self.name)
        with self._write() as (db, changes, after):
            row = db.execute("SELECT label FROM examples WHERE id=?", (example_id,)).fetchone()
            if row is None:
                raise UnknownExample(f"no example {example_id} in gallery {self.name!r}")
            db.execute("DELETE FROM examples WHERE id=?", (example_id,))
            db.execute("DELETE FROM images WHERE id=?", (example_id,))
            changes.log("remove", [example_id])
            after.append(Step("remove", [example_id]))
        return row[0]

    def remove_class(self, label: str) -> int:
        """Remove a class and its examples; returns how many examples went."""
        label = check_label(label)
        with self._write() as (db, changes, after):
            ids = [r[0] for r in db.execute("SELECT id FROM examples WHERE label=?", (label,)).fetchall()]
            if not ids:
                raise UnknownLabel(f"no class {label!r} in gallery {self.name!r}")
            db.execute("DELETE FROM examples WHERE label=?", (label,))
            db.executemany("DELETE FROM images WHERE id=?", [(i,) for i in ids])
            changes.log("remove", ids)
            after.append(Step("remove", ids))
        return len(ids)

    def rename_class(self, label: str, new_label: str) -> int:
        label, new_label = check_label(label), check_label(new_label)
        with self._write() as (db, changes, after):
            if db.execute("SELECT 1 FROM examples WHERE label=? LIMIT 1", (new_label,)).fetchone():
                raise LabelExists(f"class {new_label!r} already exists; remove it or pick another name")
            count = db.execute("SELECT COUNT(*) FROM examples WHERE label=?", (label,)).fetchone()[0]
            if not count:
                raise UnknownLabel(f"no class {label!r} in gallery {self.name!r}")
            db.execute("UPDATE examples SET label=? WHERE label=?", (new_label, label))
            changes.log("rename", label=label, new_label=new_label)
            after.append(Step("rename", rename=(label, new_label)))
        return count

    def set_blobs(self, blobs: dict[str, bytes | None]) -> None:
        """Store (bytes) or drop (None) named blobs (e.g. the adopted adapter) in one transaction."""
        with self._write() as (db, changes, after):
            for name, data in blobs.items():
                if data is None:
                    db.execute("DELETE FROM blobs WHERE name=?", (name,))
                else:
                    db.execute("INSERT INTO blobs (name, data) VALUES (?, ?) "
                               "ON CONFLICT (name) DO UPDATE SET data = excluded.data", (name, bytes(data)))
            changes.log("blobs", names=sorted(blobs))
            after.append(Step("blobs", blobs=dict(blobs)))



def _image_fields(kept: KeptImage | None) -> dict:
    return {"thumbnail": kept.thumbnail if kept else None, "original": kept.original if kept else None,
            "media_type": kept.media_type if kept else None}
