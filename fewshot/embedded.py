"""What ``fewshot embed`` writes into OUT, in either layout, and how everything else reads it back.

Both layouts carry ``meta.json`` (engine, encoder, fingerprint, dim, count, errors, format) and
``errors.jsonl`` (one row per file that gave no embedding, and why):

- ``npy``: ``embeddings.npy`` (float32 (n, dim), memory-mappable) + ``manifest.jsonl`` (row, path,
  label[, faces]). Assembled at the end from resumable shards in ``OUT/shards``.
- ``parquet``: ``OUT/parts/part-NNNNNN.parquet``, columns ``row`` (int64, 0..n-1 over all parts in
  order), ``path``, ``label``, ``embedding`` (fixed-size list of float32), ``faces`` for face
  encoders. Each part is final once written; nothing is assembled, so any Parquet reader
  (pyarrow, DuckDB, Spark, Ray Data) reads the folder as one table.

A job is split into parts of consecutive items and parts are written in order, each atomically
(its rows and errors, then the file that marks it done), so the finished parts of an interrupted
job are always a prefix and a rerun of the same command continues after them. ``job.json`` names
the job; a different job into the same OUT is refused, and so is a second run of the same job
while the first still holds ``OUT/job.lock``.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import FewShotError, InvalidArgument, OutputConflict
from .files import replaced_atomically, save_npy_atomic, write_atomic

FORMATS = ("npy", "parquet")


def package_version() -> str:
    try:
        return version("fewshot")
    except PackageNotFoundError:
        return "0+unknown"


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


@contextmanager
def job_lock(out: Path) -> Iterator[None]:
    """Held for the whole run: a second process embedding into the same OUT is refused at once."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "job.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputConflict(f"another `fewshot embed` is writing into {out} right now; wait for it, or "
                                 "choose another OUT") from None
        yield


def check_job(out: Path, job: dict) -> bool:
    """True when ``out`` already holds this finished job; starts (or resumes) it otherwise."""
    job_file = out / "job.json"
    if job_file.is_file():
        previous = json.loads(job_file.read_text())
        previous.setdefault("format", "npy")  # jobs written before the parquet layout existed
        if previous != job:
            changed = sorted(k for k in job if previous.get(k) != job[k])
            raise OutputConflict(f"{out} holds another embedding job (differs in: {', '.join(changed)}); "
                                 "choose a new OUT folder, or delete this one to start over")
        return (out / "meta.json").is_file()
    if out.exists() and any(p.name != "job.lock" for p in out.iterdir()):
        raise OutputConflict(f"{out} exists and is not an embedding job's folder; choose an empty or new OUT")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(job_file, json.dumps(job, indent=1).encode())
    return False


class Output:
    """Where one job's parts go. ``done`` parts are a prefix; ``write`` must be called in part order."""

    def __init__(self, out: Path, job: dict, parts: int) -> None:
        self.out, self.job, self.parts = out, job, parts

    def done(self) -> int:
        """How many leading parts are already written (a resumed job starts after them)."""
        n = 0
        while n < self.parts and self._is_done(n):
            n += 1
        return n

    def _is_done(self, i: int) -> bool:
        raise NotImplementedError

    def write(self, i: int, embeddings: np.ndarray, rows: list[dict], errors: list[dict]) -> None:
        raise NotImplementedError

    def finish(self, engine: str) -> tuple[int, int]:
        """After the last part: the final files and ``meta.json``; returns (rows, errors)."""
        raise NotImplementedError

    def _meta(self, engine: str, count: int, errors: int) -> None:
        job = self.job
        meta = {"engine": engine, "format": job["format"], "encoder": job["encoder"],
                "fingerprint": job["fingerprint"], "dim": job["dim"], "count": count, "errors": errors,
                "source": job["source"], "shards": self.parts, "version": package_version(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_atomic(self.out / "meta.json", json.dumps(meta, indent=1).encode())


def open_output(out: Path, job: dict, parts: int) -> Output:
    return (ParquetOutput if job["format"] == "parquet" else NpyOutput)(out, job, parts)


class NpyOutput(Output):
    """Shards ``OUT/shards/NNNNNN.{npy,json}``, assembled into ``embeddings.npy`` at the end."""

    def _shard(self, i: int, suffix: str) -> Path:
        return self.out / "shards" / f"{i:06d}.{suffix}"

    def _is_done(self, i: int) -> bool:
        return self._shard(i, "json").is_file()

    def write(self, i, embeddings, rows, errors) -> None:
        (self.out / "shards").mkdir(parents=True, exist_ok=True)
        save_npy_atomic(self._shard(i, "npy"), np.ascontiguousarray(embeddings, dtype=np.float32))
        write_atomic(self._shard(i, "json"), json.dumps({"rows": rows, "errors": errors}))

    def finish(self, engine: str) -> tuple[int, int]:
        metas = [json.loads(self._shard(i, "json").read_text()) for i in range(self.parts)]
        count = sum(len(m["rows"]) for m in metas)
        with replaced_atomically(self.out / "embeddings.npy") as tmp:
            target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, self.job["dim"]))
            row = 0
            for i in range(self.parts):
                part = np.load(self._shard(i, "npy"), mmap_mode="r")
                target[row:row + len(part)] = part
                row += len(part)
            target.flush()
            del target
        manifest = "".join(json.dumps({"row": r, **rec}) + "\n"
                           for r, rec in enumerate(rec for m in metas for rec in m["rows"]))
        write_atomic(self.out / "manifest.jsonl", manifest.encode())
        errors = [rec for m in metas for rec in m["errors"]]
        write_atomic(self.out / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in errors).encode())
        self._meta(engine, count, len(errors))
        shutil.rmtree(self.out / "shards", ignore_errors=True)
        return count, len(errors)


class ParquetOutput(Output):
    """Parts ``OUT/parts/part-NNNNNN.parquet`` (final), their errors beside them until the end."""

    def __init__(self, out: Path, job: dict, parts: int) -> None:
        super().__init__(out, job, parts)
        self.folder = out / "parts"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._next_row: int | None = None

    def _part(self, i: int) -> Path:
        return self.folder / f"part-{i:06d}.parquet"

    def _errors(self, i: int) -> Path:
        return self.folder / f"part-{i:06d}.errors.jsonl"

    def _is_done(self, i: int) -> bool:
        return self._part(i).is_file()

    def write(self, i, embeddings, rows, errors) -> None:
        import pyarrow.parquet as pq

        if self._next_row is None:  # rows of the parts before this one (read from their footers on resume)
            self._next_row = sum(pq.ParquetFile(self._part(j)).metadata.num_rows for j in range(i))
        table = embedding_table(embeddings, rows, self._next_row, self.job["dim"])
        write_atomic(self._errors(i), "".join(json.dumps(e) + "\n" for e in errors))
        with replaced_atomically(self._part(i)) as tmp:
            pq.write_table(table, tmp, compression="zstd")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        self._next_row += len(rows)

    def finish(self, engine: str) -> tuple[int, int]:
        import pyarrow.parquet as pq

        count = sum(pq.ParquetFile(self._part(i)).metadata.num_rows for i in range(self.parts))
        errors = b"".join(self._errors(i).read_bytes() for i in range(self.parts) if self._errors(i).is_file())
        write_atomic(self.out / "errors.jsonl", errors)
        self._meta(engine, count, errors.count(b"\n"))
        for i in range(self.parts):
            self._errors(i).unlink(missing_ok=True)
        return count, errors.count(b"\n")


def embedding_table(embeddings: np.ndarray, rows: list[dict], first_row: int, dim: int):
    """Rows and their vectors -> an Arrow table with the Parquet layout's columns."""
    import pyarrow as pa

    x = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(len(rows), dim)
    columns = {
        "row": pa.array(np.arange(first_row, first_row + len(rows), dtype=np.int64)),
        "path": pa.array([r["path"] for r in rows], pa.string()),
        "label": pa.array([r.get("label") for r in rows], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), dim),
    }
    if rows and "faces" in rows[0]:
        columns["faces"] = pa.array([r["faces"] for r in rows], pa.int32())
    return pa.table(columns)


# ---------------------------------------------------------------- reading
def read_meta(out: str | Path) -> dict:
    out = Path(out)
    if not (out / "meta.json").is_file():
        raise FewShotError(f"{out} holds no finished embedding job (no meta.json); run `fewshot embed` first")
    meta = json.loads((out / "meta.json").read_text())
    meta.setdefault("format", "npy")
    return meta


def load_embedded(out: str | Path) -> tuple[np.ndarray, list[dict], dict]:
    """A finished OUT folder (either layout) -> (embeddings (n, dim), manifest rows, meta). The npy
    layout's embeddings are memory-mapped; for Parquet they are read into memory (use
    ``iter_embedded`` to walk a large one in bounded memory)."""
    meta = read_meta(out)
    out = Path(out)
    if meta["format"] == "npy":
        rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line]
        return np.load(out / "embeddings.npy", mmap_mode="r"), rows, meta
    parts, rows = [], []
    for x, chunk in iter_embedded(out):
        parts.append(x)
        rows.extend(chunk)
    embeddings = np.concatenate(parts) if parts else np.zeros((0, meta["dim"]), np.float32)
    return embeddings, rows, meta


def iter_embedded(out: str | Path, batch_rows: int = 8192) -> Iterator[tuple[np.ndarray, list[dict]]]:
    """(embeddings (b, dim), manifest rows) in row order, at most ``batch_rows`` at a time, without
    reading the whole set into memory (either layout)."""
    meta = read_meta(out)
    out, dim = Path(out), meta["dim"]
    if meta["format"] == "npy":
        embeddings = np.load(out / "embeddings.npy", mmap_mode="r")
        with open(out / "manifest.jsonl", encoding="utf-8") as manifest:
            rows: list[dict] = []
            for line in manifest:
                if line.strip():
                    rows.append(json.loads(line))
                if len(rows) == batch_rows:
                    yield np.array(embeddings[rows[0]["row"]:rows[-1]["row"] + 1]), rows
                    rows = []
            if rows:
                yield np.array(embeddings[rows[0]["row"]:rows[-1]["row"] + 1]), rows
        return
    import pyarrow.parquet as pq

    vectors: list[np.ndarray] = []
    rows = []
    for part in sorted((out / "parts").glob("part-*.parquet")):
        for batch in pq.ParquetFile(part).iter_batches(batch_size=batch_rows):
            if not batch.num_rows:
                continue
            names = [n for n in ("row", "path", "label", "faces") if n in batch.schema.names]
            columns = [batch.column(n).to_pylist() for n in names]
            rows.extend(dict(zip(names, values)) for values in zip(*columns))
            flat = batch.column("embedding").flatten().to_numpy(zero_copy_only=False)
            vectors.append(np.asarray(flat, np.float32).reshape(batch.num_rows, dim))
            while len(rows) >= batch_rows:  # parts are re-cut into batches of exactly batch_rows
                x = np.concatenate(vectors)
                yield x[:batch_rows], rows[:batch_rows]
                vectors, rows = [x[batch_rows:]], rows[batch_rows:]
    if rows:
        yield np.concatenate(vectors), rows
