"""Galleries to and from embedded datasets: ``fewshot gallery import`` streams the output of
``fewshot embed`` (either layout) into a gallery, ``fewshot gallery export`` writes a gallery out
in those layouts. Both walk the data in bounded batches, so a million rows never sit in memory.

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

from tqdm import tqdm

from .embedded import iter_embedded, open_output, read_meta
from .errors import InvalidLabel
from .gallery import GalleryStore, check_label


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
        done = int(gallery.meta_value(key) or 0)  # rows of OUT already read by an earlier run
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
                rows, vectors = gallery.example_rows(after, batch_rows)
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
