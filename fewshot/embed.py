"""Offline batch embedding on this machine (the ``local`` engine): source -> worker decode ->
batched embed -> resumable parts -> OUT, in either layout of ``fewshot.embedded``. The ``ray``
engine (``fewshot.ray_engine``) writes the same OUT from a Ray cluster.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .datasets import Item, Reader, is_uri, list_items
from .embedded import check_format, check_job, job_lock, open_output, read_meta
from .encoders import Encoder, locate_main
from .errors import InvalidArgument, InvalidImage
from .images import MAX_BYTES, MAX_PIXELS, Preprocessing, WholeImage
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
    unlabelled: int = 0  # images outside any class folder (their label is null)

    @property
    def steady_images_per_second(self) -> float:
        """Throughput once decoding is flowing (worker start-up excluded)."""
        busy = self.seconds - self.startup_seconds
        return (self.count + self.errors) / busy if busy > 0 else 0.0

    @classmethod
    def finished(cls, out: Path, started: float) -> "EmbedReport":
        """The report of a job that OUT already holds, finished: nothing to do."""
        meta = read_meta(out)
        return cls(out, meta["count"], meta["errors"], time.perf_counter() - started, meta["shards"],
                   already_done=True)

    @property
    def images_per_second(self) -> float:
        return (self.count + self.errors) / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------- worker side
_worker: dict = {}  # per worker process: the reader and the preprocessing it was started with


def set_up_decoding(prep: Preprocessing, max_bytes: int, max_pixels: int, locator) -> None:
    """What ``decode_item`` reads: in each worker process, or in the main process when there are none."""
    _worker.update(reader=Reader(), prep=prep, limits=(max_bytes, max_pixels), locator=locator)


def decoding_set_up() -> bool:
    """Has this process been set up to decode (``set_up_decoding``)?"""
    return bool(_worker)


def _init_worker(prep: Preprocessing, max_bytes: int, max_pixels: int, locator, niceness: int = 0) -> None:
    """A worker process: low priority, Ctrl-C left to the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # spawn start method (the fork server's are set already)
    if niceness:
        os.nice(niceness)
    set_up_decoding(prep, max_bytes, max_pixels, locator)


Decoded = tuple[np.ndarray | None, str | None, int]  # (pixels of the main instance, error, instances found)


def decode_item(item: Item) -> Decoded:
    """One item -> (pixels, None, instances) or (None, reason, 0). Never raises for a bad file."""
    try:
        data = _worker["reader"].read(item.path)
    except (OSError, KeyError, ValueError) as exc:
        return None, f"unreadable: {exc}", 0
    try:
        main, found = locate_main(data, _worker["locator"], _worker["prep"], *_worker["limits"])
    except InvalidImage as exc:  # NoFace is one
        return None, str(exc), 0
    return main.pixels, None, found


def _decode_chunk(items: list[Item]) -> list[Decoded]:
    return [decode_item(item) for item in items]


# ---------------------------------------------------------------- main side
def shard_size_for(items: int) -> int:
    """Images per resumable shard when not given: ~1/50 of the job, from 32 (a job of a few hundred
    images keeps its progress when interrupted) to 1024 (few files for millions of images)."""
    return int(min(1024, max(32, items // 50)))


def job_for(src: str | Path, items: list[Item], encoder: Encoder, shard_size: int | None, fmt: str) -> dict:
    """What names an embedding job: a rerun with the same one resumes it, another is refused."""
    shard_size = shard_size_for(len(items)) if shard_size is None else int(shard_size)
    if shard_size < 1:
        raise InvalidArgument(f"shard size must be at least 1 image, got {shard_size}")
    source = str(src) if is_uri(str(src)) else str(Path(src).expanduser().resolve())
    return {"source": source, "items": len(items), "listing": _listing_hash(items), "encoder": encoder.spec,
            "fingerprint": encoder.fingerprint, "dim": encoder.dim, "shard_size": shard_size,
            "format": check_format(fmt)}


def embed_dataset(src: str | Path, out: str | Path, encoder: Encoder, batch_size: int = 32,
                  workers: int | None = None, shard_size: int | None = SHARD_SIZE,
                  progress: bool = True, format: str = "npy") -> EmbedReport:
    """Embed every image under ``src`` into ``out`` (``format`` npy or parquet); resumes a previous
    run of the same job."""
    started = time.perf_counter()
    out = Path(out)
    items = list_items(src)
    job = job_for(src, items, encoder, shard_size, format)
    with job_lock(out):
        if check_job(out, job):
            return EmbedReport.finished(out, started)
        shards = [items[i:i + job["shard_size"]] for i in range(0, len(items), job["shard_size"])]
        output = open_output(out, job, len(shards))
        done = output.done()
        todo = sum(len(s) for s in shards[done:])
        workers = owned_cores() if workers is None else workers
        bar = tqdm(total=todo, unit="img", desc="embed", disable=not progress, dynamic_ncols=True)
        if done and progress:
            bar.write(f"resuming: {done} of {len(shards)} parts already done")
        bad, arrival = 0, []
        with PixelDecoder(encoder.preprocessing, workers, encoder.max_bytes, encoder.max_pixels,
                          encoder.locator) as decode:
            results = _first_arrival(decode([item for shard in shards[done:] for item in shard]), arrival)
            for i in range(done, len(shards)):
                embeddings, rows, errors = _embed_shard(shards[i], results, encoder, batch_size, bar,
                                                        counts=encoder.finds_faces)
                output.write(i, embeddings, rows, errors)
                bad += len(errors)
                if errors:
                    bar.set_postfix(errors=bad)
        bar.close()
        count, errors = output.finish("local")
    startup = arrival[0] - started if arrival else 0.0
    return EmbedReport(out, count, errors, time.perf_counter() - started, done, startup,
                       unlabelled=sum(item.label is None for item in items))


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


def _pool_context():
    """Fork is unsafe beside the runtime's threads. A fork server imports the decoding code once
    and forks ready workers from it (spawn would import it again in every worker).

    Ctrl-C in a terminal goes to the whole process group, and only the main process should act on
    it (it ends the pool and keeps every finished shard): a worker interrupted mid-task prints a
    traceback, and one that dies holding the pool's queue lock makes ``Pool.terminate()`` hang. So
    the fork server is started with SIGINT ignored, which it keeps across exec and hands to every
    worker it forks; the main process ignores it only for the instant of that fork and exec."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fewshot.embed"])
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, previous)
    return context


@contextmanager
def _interrupt_deferred() -> Iterator[list]:
    """Hold a Ctrl-C that arrives inside the block (the pool's start-up, while the fork server
    imports the decoding code) until it ends; the list yielded is non-empty if one came."""
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
            set_up_decoding(*self.args[:4])
        return self.decode

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()

    def decode(self, items: list[Item]) -> Iterator[Decoded]:
        if self.pool is None:
            yield from map(decode_item, items)
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
