"""Galleries to and from embedded datasets: ``fewshot gallery import`` streams the output of
``fewshot embed`` (either layout) into a gallery, ``fewshot gallery export`` writes a gallery out
in those layouts, and ``fewshot gallery copy`` moves galleries between stores (SQLite files and
PostgreSQL, either way). All walk the data in bounded batches, so a million rows never sit in memory.

An import commits one transaction per batch and records how far it got in the same transaction:
run again after an interruption, it continues after the last committed batch (no duplicates).
A server that has the gallery open sees the new examples on its next request.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .embedded import iter_embedded, open_output, read_meta
from .errors import InvalidArgument, InvalidLabel
from .gallery import Gallery
from .gallery_store import GalleryStore
from .validate import check_label


@dataclass
class ImportReport:
    gallery: str
    imported: int
    skipped: int  # rows without a usable label
    already: int  # rows an earlier, interrupted run had imported
    seconds: float
    reasons: dict = field(default_factory=dict)  # why rows were skipped -> how many


def import_embedded(store: GalleryStore, out: str | Path, name: str, batch_rows: int = 10_000,
                    progress: bool = True) -> ImportReport:
    """Every labelled row of OUT into gallery ``name`` (made with OUT's encoder when missing; an
    existing one must hold the same encoder fingerprint)."""
    started = time.perf_counter()
    meta = read_meta(out)
    key = "import:" + hashlib.sha256((Path(out) / "meta.json").read_bytes()).hexdigest()[:16]
    imported = skipped = 0
    reasons: dict[str, int] = {}
    with store.use(name, meta["dim"], meta["fingerprint"], meta["encoder"], create=True) as gallery:
        done = int(gallery.rows.meta_value(key) or 0)  # rows of OUT already read by an earlier run
        seen = 0
        with tqdm(total=meta["count"], initial=min(done, meta["count"]), unit="row", desc=f"import {name}",
                  disable=not progress, dynamic_ncols=True) as bar:
            for vectors, rows in iter_embedded(out, batch_rows):
                seen += len(rows)
                if seen <= done:
                    continue
                keep, labels, metadata = [], [], []
                for j, row in enumerate(rows):
                    if seen - len(rows) + j < done:
                        continue
                    try:
                        labels.append(check_label(row.get("label")))
                    except InvalidLabel as exc:
                        reason = "no label (the image sat at the top of SRC)" if row.get("label") is None else str(exc)
                        reasons[reason] = reasons.get(reason, 0) + 1
                        continue
                    keep.append(j)
                    metadata.append({"source": row.get("path")})
                gallery.add_many(labels, vectors[keep], metadata, mark=(key, str(seen)))
                imported += len(keep)
                skipped += len(rows) - len(keep)
                bar.update(len(rows))
    return ImportReport(name, imported, skipped, min(done, meta["count"]), time.perf_counter() - started, reasons)


def export_gallery(store: GalleryStore, name: str, out: str | Path, format: str = "parquet",
                   batch_rows: int = 8192, progress: bool = True) -> tuple[int, Path]:
    """Gallery ``name`` -> OUT in the layout of ``fewshot embed`` (``path`` is the example's source
    when it was imported, else ``gallery:<name>/<id>``). Returns (rows, OUT)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        from .errors import OutputConflict

        raise OutputConflict(f"{out} exists and is not empty; choose a new folder to export into")
    with store.use(name) as gallery:
        total = len(gallery)
        job = {"source": f"gallery:{name}", "items": total, "listing": "", "encoder": gallery.encoder,
               "fingerprint": gallery.fingerprint, "dim": gallery.dim, "shard_size": batch_rows, "format": format}
        out.mkdir(parents=True)
        (out / "job.json").write_text(json.dumps(job, indent=1))
        output = open_output(out, job, 0)
        after, written, part = -1, 0, 0
        with tqdm(total=total, unit="row", desc=f"export {name}", disable=not progress, dynamic_ncols=True) as bar:
            while True:
                rows, vectors = gallery.rows.examples(after, batch_rows)
                if not rows and part:  # an empty gallery still gets one (empty) part
                    break
                manifest = [{"path": (r["metadata"] or {}).get("source") or f"gallery:{name}/{r['id']}",
                             "label": r["label"]} for r in rows]
                output.write(part, vectors, manifest, [])
                part, written = part + 1, written + len(rows)
                bar.update(len(rows))
                if not rows:
                    break
                after = rows[-1]["id"]
        output.parts = part  # the gallery may have changed while it was read: as many parts as were written
        output.finish("gallery")
    return written, out


@dataclass
class CopyReport:
    gallery: str
    copied: int  # examples written by this run
    already: int  # examples an earlier, interrupted run had copied
    examples: int  # in the source = in the target, verified
    images: int  # examples whose kept images came along
    seconds: float


def copy_galleries(source: GalleryStore, target: GalleryStore, names: list[str] | None = None, batch_rows: int = 256,
                   progress: bool = True) -> list[CopyReport]:
    """Copy galleries (all, or ``names``) with their ids, labels, times, metadata and kept images, then
    verify that the target holds exactly the source's examples, vectors byte for byte. Resumable: a
    target that already holds a prefix of the source's ids continues after it; a target gallery with
    other examples, or another encoder, is refused."""
    reports = []
    for name in names or source.names():
        started = time.perf_counter()
        with source.use(name) as src, target.use(name, src.dim, src.fingerprint, src.encoder, create=True,
                                                 index=src.index_kind) as dst:
            done = dst.labels_by_id()
            after = max(done, default=-1)
            stray = sorted(set(done) - set(src.labels_by_id()))
            if stray:
                raise InvalidArgument(f"gallery {name!r} in the target holds {len(stray)} example(s) the source does "
                                      f"not (ids {stray[:5]}...): copy into an empty or new gallery")
            copied = images = 0
            with tqdm(total=len(src), initial=len(done), unit="ex", desc=f"copy {name}", disable=not progress,
                      dynamic_ncols=True) as bar:
                while rows := src.rows.kept(after, batch_rows, vectors=True):
                    x = np.frombuffer(b"".join(r.pop("vector") for r in rows), np.float32).reshape(len(rows), src.dim)
                    dst.import_rows(rows, x)
                    copied += len(rows)
                    images += sum(r["thumbnail"] is not None or r["original"] is not None for r in rows)
                    after = rows[-1]["id"]
                    bar.update(len(rows))
            examples = verify_copy(src, dst)
        reports.append(CopyReport(name, copied, len(done), examples, images, time.perf_counter() - started))
    return reports


def verify_copy(src: Gallery, dst: Gallery, page: int = 8192) -> int:
    """Both galleries hold the same examples: ids, labels and vectors byte for byte; returns how many."""
    after, total = -1, 0
    while True:
        rows_a, x_a = src.rows.examples(after, page)
        rows_b, x_b = dst.rows.examples(after, page)
        if [(r["id"], r["label"]) for r in rows_a] != [(r["id"], r["label"]) for r in rows_b] or \
                x_a.tobytes() != x_b.tobytes():
            raise InvalidArgument(f"gallery {src.name!r}: the copy differs from the source after id {after}; "
                                  "run the copy again (it continues), or copy into a new database")
        if not rows_a:
            return total
        total += len(rows_a)
        after = rows_a[-1]["id"]
