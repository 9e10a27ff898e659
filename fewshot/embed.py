"""Offline batch embedding: source -> worker decode -> batched embed -> resumable shards -> OUT.

OUT holds ``embeddings.npy`` (float32 (n, dim), memory-mappable), ``manifest.jsonl`` (one row per
embedding: path, label), ``errors.jsonl`` (unreadable files and why) and ``meta.json``. While the
job runs, finished shards sit in ``OUT/shards``; each is written atomically (npy, then the json
that marks it done), so a job killed at any point resumes at its first unfinished shard.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .datasets import Item, Reader, list_items
from .encoders import Encoder, main_instance
from .errors import FewShotError, InvalidArgument, InvalidImage, OutputConflict
from .files import replaced_atomically, save_npy_atomic, write_atomic
from .images import MAX_BYTES, MAX_PIXELS, Preprocessing, WholeImage, decode_image
from .runtimes import owned_cores

SHARD_SIZE = None  # auto: about 1/50 of the job, 32 to 1024 images (see shard_size_for)
# Decode workers run at the lowest priority: the encoder's intra-op threads meet at a barrier
# after every layer, so one of them preempted by a decoder stalls all; low-priority decoders
# fill the gaps instead, and still get whole cores whenever the encoder waits for pixels.
WORKER_NICENESS = 19


@dataclass
class EmbedReport:
    out: Path
    count: int  # rows in embeddings.npy
    errors: int
    seconds: float
    resumed_shards: int
    startup_seconds: float = 0.0  # until the first decoded image reached the encoder
    already_done: bool = False  # OUT already held this finished job: nothing was embedded

    @property
    def steady_images_per_second(self) -> float:
        """Throughput once decoding is flowing (worker start-up excluded)."""
        busy = self.seconds - self.startup_seconds
        return (self.count + self.errors) / busy if busy > 0 else 0.0

    @property
    def images_per_second(self) -> float:
        return (self.count + self.errors) / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------- worker side
_worker: dict = {}  # per worker process: the reader and the preprocessing it was started with


def _set_up(prep: Preprocessing, max_bytes: int, max_pixels: int, locator) -> None:
    """What ``_decode`` reads: in each worker process, or in the main process when there are none."""
    _worker.update(reader=Reader(), prep=prep, limits=(max_bytes, max_pixels), locator=locator)


def _init_worker(prep: Preprocessing, max_bytes: int, max_pixels: int, locator, niceness: int = 0) -> None:
    """A worker process: low priority, one torch thread, Ctrl-C left to the main process."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # spawn start method (the fork server's are set already)
    if niceness:
        os.nice(niceness)
    torch.set_num_threads(1)  # one core per worker; the encoder owns the rest
    _set_up(prep, max_bytes, max_pixels, locator)


Decoded = tuple[np.ndarray | None, str | None, int]  # (pixels of the main instance, error, instances found)


def _decode(item: Item) -> Decoded:
    """One item -> (pixels, None, instances) or (None, reason, 0). Never raises for a bad file."""
    try:
        data = _worker["reader"].read(item.path)
    except (OSError, KeyError, ValueError) as exc:
        return None, f"unreadable: {exc}", 0
    try:
        found = _worker["locator"](decode_image(data, *_worker["limits"]), _worker["prep"])
        main = main_instance(found, _worker["locator"].kind == "faces")  # NoFace is an InvalidImage
    except InvalidImage as exc:
        return None, str(exc), 0
    return main.pixels, None, len(found)


def _decode_chunk(items: list[Item]) -> list[Decoded]:
    return [_decode(item) for item in items]


# ---------------------------------------------------------------- main side
def shard_size_for(items: int) -> int:
    """Images per resumable shard when not given: ~1/50 of the job, from 32 (a job of a few hundred
    images keeps its progress when interrupted) to 1024 (few files for millions of images)."""
    return int(min(1024, max(32, items // 50)))


def embed_dataset(src: str | Path, out: str | Path, encoder: Encoder, batch_size: int = 32,
                  workers: int | None = None, shard_size: int | None = SHARD_SIZE,
                  progress: bool = True) -> EmbedReport:
    """Embed every image under ``src`` into ``out``; resumes a previous run of the same job."""
    started = time.perf_counter()
    out = Path(out)
    items = list_items(src)
    shard_size = shard_size_for(len(items)) if shard_size is None else int(shard_size)
    if shard_size < 1:
        raise InvalidArgument(f"shard size must be at least 1 image, got {shard_size}")
    job = {"source": str(Path(src).expanduser().resolve()), "items": len(items), "listing": _listing_hash(items),
           "encoder": encoder.spec, "fingerprint": encoder.fingerprint, "dim": encoder.dim, "shard_size": shard_size}
    if _check_job(out, job):
        meta = json.loads((out / "meta.json").read_text())
        return EmbedReport(out, meta["count"], meta["errors"], time.perf_counter() - started, meta["shards"],
                           already_done=True)
    shards = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    done = {i for i in range(len(shards)) if (out / "shards" / f"{i:06d}.json").is_file()}
    pending = [i for i in range(len(shards)) if i not in done]
    todo = sum(len(shards[i]) for i in pending)
    workers = owned_cores() if workers is None else workers
    bar = tqdm(total=todo, unit="img", desc="embed", disable=not progress, dynamic_ncols=True)
    if done and progress:
        bar.write(f"resuming: {len(done)} of {len(shards)} shards already done")
    bad, arrival = 0, []
    with PixelDecoder(encoder.preprocessing, workers, encoder.max_bytes, encoder.max_pixels,
                      encoder.locator) as decode:
        results = _first_arrival(decode([item for i in pending for item in shards[i]]), arrival)
        for i in pending:
            embeddings, rows, errors = _embed_shard(shards[i], results, encoder, batch_size, bar,
                                                    counts=encoder.finds_faces)
            save_npy_atomic(out / "shards" / f"{i:06d}.npy", np.ascontiguousarray(embeddings, dtype=np.float32))
            write_atomic(out / "shards" / f"{i:06d}.json", json.dumps({"rows": rows, "errors": errors}))
            bad += len(errors)
            if errors:
                bar.set_postfix(errors=bad)
    bar.close()
    count, errors = _assemble(out, len(shards), job)
    startup = arrival[0] - started if arrival else 0.0
    return EmbedReport(out, count, errors, time.perf_counter() - started, len(done), startup)


def _first_arrival(results: Iterator, arrival: list[float]) -> Iterator:
    """Pass ``results`` through, noting when the first one arrives."""
    for result in results:
        if not arrival:
            arrival.append(time.perf_counter())
        yield result


def _listing_hash(items: list[Item]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.path}\t{item.label}\n".encode())
    return digest.hexdigest()


def _check_job(out: Path, job: dict) -> bool:
    """True when ``out`` already holds this finished job; starts or resumes it otherwise."""
    job_file = out / "job.json"
    if job_file.is_file():
        previous = json.loads(job_file.read_text())
        if previous != job:
            changed = sorted(k for k in job if previous.get(k) != job[k])
            raise OutputConflict(f"{out} holds another embedding job (differs in: {', '.join(changed)}); "
                                 "choose a new OUT folder, or delete this one to start over")
        return (out / "meta.json").is_file()
    if out.exists() and any(out.iterdir()):
        raise OutputConflict(f"{out} exists and is not an embedding job's folder; choose an empty or new OUT")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    write_atomic(job_file, json.dumps(job, indent=1).encode())
    return False


def _pool_context():
    """Fork is unsafe beside the runtime's threads. A fork server imports torch once and forks
    ready workers from it (spawn would import it again in every worker: seconds of CPU each).

    Ctrl-C in a terminal goes to the whole process group, and only the main process should act on
    it (it ends the pool and keeps every finished shard): a worker interrupted mid-task prints a
    traceback, and one that dies holding the pool's queue lock makes ``Pool.terminate()`` hang. So
    the fork server is started with SIGINT ignored, which it keeps across exec and hands to every
    worker it forks; the main process ignores it only for the instant of that fork and exec."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "fewshot.embed"])
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, previous)
    return context


@contextmanager
def _interrupt_deferred() -> Iterator[list]:
    """Hold a Ctrl-C that arrives inside the block (the pool's start-up: ~1 s while the fork server
    imports torch) until it ends; the list yielded is non-empty if one came."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    interrupted: list = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


class PixelDecoder:
    """Context manager giving ``decode(items) -> iterator of (pixels, error)`` in order.

    With workers, decoding runs in a process pool ahead of the encoder, with a bounded number of
    chunks in flight (back-pressure: a slow encoder never lets decoded images pile up in memory).
    """

    def __init__(self, prep: Preprocessing, workers: int, max_bytes: int = MAX_BYTES,
                 max_pixels: int = MAX_PIXELS, locator=None) -> None:
        self.args = (prep, max_bytes, max_pixels, locator or WholeImage(), WORKER_NICENESS)
        self.workers = workers
        self.pool = None

    def __enter__(self):
        if self.workers > 0:
            with _interrupt_deferred() as interrupted:
                self.pool = _pool_context().Pool(self.workers, initializer=_init_worker, initargs=self.args)
            if interrupted:  # end the new workers before leaving: half-started ones would print tracebacks
                self.__exit__(KeyboardInterrupt, None, None)
                raise KeyboardInterrupt
        else:  # decode inline: the main process keeps its priority, threads and Ctrl-C
            _set_up(*self.args[:4])
        return self.decode

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()

    def decode(self, items: list[Item]) -> Iterator[Decoded]:
        if self.pool is None:
            yield from map(_decode, items)
            return
        chunk = 8
        in_flight: deque = deque()
        chunks = (items[i:i + chunk] for i in range(0, len(items), chunk))
        for part in chunks:
            in_flight.append(self.pool.apply_async(_decode_chunk, (part,)))
            if len(in_flight) >= 4 * self.workers:
                yield from in_flight.popleft().get()
        while in_flight:
            yield from in_flight.popleft().get()


def _embed_shard(shard: list[Item], results: Iterator, encoder: Encoder, batch_size: int,
                 bar: tqdm, counts: bool = False) -> tuple[np.ndarray, list[dict], list[dict]]:
    """Decode results for one shard -> (embeddings, manifest rows, error rows). ``counts``: rows say
    how many faces their image had (the largest one is embedded)."""
    rows, errors, pixels, parts = [], [], [], []
    for item, (pix, error, found) in zip(shard, results):
        if error is not None:
            errors.append({"path": item.path, "label": item.label, "error": error})
        else:
            rows.append({"path": item.path, "label": item.label, **({"faces": found} if counts else {})})
            pixels.append(pix)
            if len(pixels) == batch_size:
                parts.append(encoder.embed(np.stack(pixels)))
                pixels = []
        bar.update(1)
    if pixels:
        parts.append(encoder.embed(np.stack(pixels)))
    embeddings = np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)
    return embeddings, rows, errors


def _assemble(out: Path, n_shards: int, job: dict) -> tuple[int, int]:
    """Shards -> embeddings.npy, manifest.jsonl, errors.jsonl, then meta.json (the job is done)."""
    metas = [json.loads((out / "shards" / f"{i:06d}.json").read_text()) for i in range(n_shards)]
    count = sum(len(m["rows"]) for m in metas)
    with replaced_atomically(out / "embeddings.npy") as tmp:
        target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, job["dim"]))
        row = 0
        for i in range(n_shards):
            part = np.load(out / "shards" / f"{i:06d}.npy", mmap_mode="r")
            target[row:row + len(part)] = part
            row += len(part)
        target.flush()
        del target
    manifest = "".join(json.dumps({"row": r, **rec}) + "\n"
                       for r, rec in enumerate(rec for m in metas for rec in m["rows"]))
    write_atomic(out / "manifest.jsonl", manifest.encode())
    errors = [rec for m in metas for rec in m["errors"]]
    write_atomic(out / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in errors).encode())
    meta = {"encoder": job["encoder"], "fingerprint": job["fingerprint"], "dim": job["dim"], "count": count,
            "errors": len(errors), "source": job["source"], "shards": n_shards, "version": package_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_atomic(out / "meta.json", json.dumps(meta, indent=1).encode())
    shutil.rmtree(out / "shards", ignore_errors=True)
    return count, len(errors)


def load_embedded(out: str | Path) -> tuple[np.ndarray, list[dict], dict]:
    """A finished OUT folder -> (embeddings memory-mapped (n, dim), manifest rows, meta)."""
    out = Path(out)
    if not (out / "meta.json").is_file():
        raise FewShotError(f"{out} holds no finished embedding job (no meta.json); run `fewshot embed` first")
    meta = json.loads((out / "meta.json").read_text())
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line]
    return np.load(out / "embeddings.npy", mmap_mode="r"), rows, meta


def package_version() -> str:
    try:
        return version("fewshot")
    except PackageNotFoundError:
        return "0+unknown"
