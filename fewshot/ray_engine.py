"""The ``ray`` engine of ``fewshot embed``: the same job and the same OUT as the local engine, run as a
Ray Data pipeline on a local Ray instance or on a cluster.

    listing (driver) -> blocks of paths -> read + decode + preprocess (CPU tasks)
        -> embed (actor pool: one encoder per actor, created once; GPUs per actor) -> driver -> OUT

The driver holds the listing and writes OUT part by part, in order, as rows come back (Ray Data
streams: blocks in flight are bounded, so the driver's memory does not grow with the dataset).
Workers read SRC, so on a cluster SRC must be readable from every node (a shared path, or a URI
such as ``s3://bucket/prefix``); OUT is only written by the driver. A worker that dies has its tasks
retried by Ray; a driver that dies leaves finished parts behind, and the same command resumes.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .datasets import Item, list_items
from .embed import WORKER_NICENESS, EmbedReport, decode_item, decoding_set_up, job_for, set_up_decoding
from .embedded import check_job, job_lock, open_output
from .encoders import create_encoder
from .errors import FewShotError, InvalidArgument
from .runtimes import owned_cores

BLOCK_ITEMS = 32  # paths per decode task
DECODE_MEMORY = 512 * 2**20  # reserved per decode task: a Ray worker process (~470 MiB measured) with its images


class RayMissing(FewShotError):
    code = "ray_missing"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayMissing("the ray engine needs Ray Data: pip install 'fewshot[ray]' (or pip install 'ray[data]')") \
            from None
    return ray


def start_ray(address: str | None = None):
    """Join the cluster at ``address``, or start a local instance on this machine's cores. A Ray
    already started in this process (tests, notebooks) is used as it is."""
    ray = _import_ray()
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-run INFO lines would break the progress bar
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        else:
            ray.init(num_cpus=owned_cores(), include_dashboard=False, log_to_driver=False,
                     logging_level="WARNING")
    return ray


# ---------------------------------------------------------------- worker side
def _decode_block(batch: dict, prep, max_bytes: int, max_pixels: int, locator) -> dict:
    """A block of paths -> pixels of each image's main instance (zeros where it failed) and why."""
    if not decoding_set_up():  # first block in this worker process: low priority, one thread
        os.nice(WORKER_NICENESS)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        set_up_decoding(prep, max_bytes, max_pixels, locator)
    n = len(batch["item"])
    pixels = np.zeros((n, 3, *prep.size), np.uint8)
    errors, faces = [], np.zeros(n, np.int32)
    for j, path in enumerate(batch["path"]):
        pix, error, found = decode_item(Item(str(path), None))
        if pix is not None:
            pixels[j] = pix
        errors.append(error or "")
        faces[j] = found
    return {"item": batch["item"], "pixels": pixels, "error": np.array(errors, dtype=object), "faces": faces}


class _Embedder:
    """One per actor: the encoder is created once, on the actor's GPU when it has one."""

    def __init__(self, options: dict, fingerprint: str, threads: int | None) -> None:
        import ray

        gpu = bool(ray.get_gpu_ids())
        self.encoder = create_encoder(**options, device="cuda" if gpu else "cpu", runtime="auto",
                                      threads=None if gpu else threads)
        if self.encoder.fingerprint != fingerprint:
            raise FewShotError(f"this worker's encoder has fingerprint {self.encoder.fingerprint}, the job's is "
                               f"{fingerprint}: install the same fewshot version and weights on every node")

    def __call__(self, batch: dict) -> dict:
        ok = np.array([not e for e in batch["error"]], bool)
        embeddings = np.zeros((len(ok), self.encoder.dim), np.float32)
        if ok.any():
            embeddings[ok] = self.encoder.embed(batch["pixels"][ok])
        return {"item": batch["item"], "embedding": embeddings, "error": batch["error"], "faces": batch["faces"]}


# ---------------------------------------------------------------- driver
def embed_dataset_ray(src: str | Path, out: str | Path, spec: str, *, address: str | None = None,
                      actors: int | None = None, gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0,
                      batch_size: int = 32, shard_size: int | None = None, format: str = "parquet",
                      cache_dir: str | Path | None = None, progress: bool = True) -> EmbedReport:
    """Embed every image under ``src`` into ``out`` with Ray Data (see the module's doc); resumes a
    previous run of the same job, whichever engine started it."""
    started = time.perf_counter()
    if actors is not None and actors < 1:
        raise InvalidArgument(f"--actors must be at least 1, got {actors}")
    if gpus_per_actor < 0 or cpus_per_actor <= 0:
        raise InvalidArgument("--gpus-per-actor must be >= 0 and --cpus-per-actor > 0")
    ray = start_ray(address)
    out = Path(out)
    items = list_items(src)
    options = {"spec": spec, "cache_dir": cache_dir}
    encoder = create_encoder(**options, device="cpu")  # the job's identity (and a warm cache for local actors)
    job = job_for(src, items, encoder, shard_size, format)
    with job_lock(out):
        if check_job(out, job):
            return EmbedReport.finished(out, started)
        size = job["shard_size"]
        parts = [items[i:i + size] for i in range(0, len(items), size)]
        output = open_output(out, job, len(parts))
        done = output.done()
        first = done * size
        bar = tqdm(total=len(items) - first, unit="img", desc="embed (ray)", disable=not progress,
                   dynamic_ncols=True)
        if done and progress:
            bar.write(f"resuming: {done} of {len(parts)} parts already done")
        local = address is None and not _is_cluster(ray)
        pool, threads = _actor_pool(ray, actors, gpus_per_actor, cpus_per_actor, local)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        listing = ray.data.from_items([{"item": i, "path": items[i].path} for i in range(first, len(items))],
                                      override_num_blocks=max(1, -(-(len(items) - first) // BLOCK_ITEMS)))
        # The memory a decode task reserves also keeps decoding in tasks of its own: Ray Data fuses
        # steps with equal resource requests, which would decode serially inside the actors.
        decoded = listing.map_batches(
            _decode_block, batch_size=None, batch_format="numpy", num_cpus=1, memory=DECODE_MEMORY,
            fn_kwargs={"prep": encoder.preprocessing, "max_bytes": encoder.max_bytes,
                       "max_pixels": encoder.max_pixels, "locator": encoder.locator})
        embedded = decoded.map_batches(
            _Embedder, batch_size=batch_size, batch_format="numpy", compute=pool,
            num_gpus=gpus_per_actor or None, num_cpus=cpus_per_actor,
            fn_constructor_kwargs={"options": options, "fingerprint": encoder.fingerprint, "threads": threads})
        writer = _InOrder(output, parts, done, encoder.dim, encoder.finds_faces)
        arrival = None
        for batch in embedded.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            arrival = arrival or time.perf_counter()
            bad = writer.take(batch)
            bar.update(len(batch["item"]))
            if bad:
                bar.set_postfix(errors=writer.errors)
        bar.close()
        if writer.next_part != len(parts):
            raise FewShotError(f"the pipeline ended after part {writer.next_part} of {len(parts)}; run the same "
                               "command again to finish the job")
        count, errors = output.finish("ray")
    startup = (arrival - started) if arrival else 0.0
    return EmbedReport(out, count, errors, time.perf_counter() - started, done, startup,
                       unlabelled=sum(item.label is None for item in items))


def _is_cluster(ray) -> bool:
    return len(ray.nodes()) > 1


def _actor_pool(ray, actors: int | None, gpus: float, cpus: float, local: bool) -> tuple:
    """(concurrency for Ray Data, threads per CPU actor). On a local instance without GPUs: one
    actor whose runtime uses every core, decoding at low priority beside it (as the local engine
    does). Elsewhere: ``actors`` if given, else an autoscaling pool up to what the cluster holds."""
    from ray.data import ActorPoolStrategy

    if local and not gpus:
        return ActorPoolStrategy(size=actors or 1), owned_cores() if not actors else max(1, int(cpus))
    if actors:
        return ActorPoolStrategy(size=actors), max(1, int(cpus))
    resources = ray.cluster_resources()
    if gpus:
        most = max(1, int(resources.get("GPU", 0) // gpus))
    else:  # half the CPUs embed, half decode
        most = max(1, int(resources.get("CPU", 1) // (2 * cpus)))
    return ActorPoolStrategy(min_size=1, max_size=most), max(1, int(cpus))


class _InOrder:
    """Rows come back by item index; parts are written, in order, as soon as each is complete."""

    def __init__(self, output, parts: list[list[Item]], done: int, dim: int, faces: bool) -> None:
        self.output, self.parts, self.dim, self.faces = output, parts, dim, faces
        self.size = len(parts[0]) if parts else 1
        self.next_part = done
        self.results: dict[int, tuple] = {}
        self.errors = 0

    def take(self, batch: dict) -> int:
        bad = 0
        for item, embedding, error, faces in zip(batch["item"], batch["embedding"], batch["error"], batch["faces"]):
            self.results[int(item)] = (embedding, str(error), int(faces))
            bad += bool(error)
        self.errors += bad
        while self.next_part < len(self.parts) and self._complete(self.next_part):
            self._write(self.next_part)
            self.next_part += 1
        return bad

    def _complete(self, i: int) -> bool:
        start = i * self.size
        return all(j in self.results for j in range(start, start + len(self.parts[i])))

    def _write(self, i: int) -> None:
        rows, errors, vectors = [], [], []
        for j, item in enumerate(self.parts[i], start=i * self.size):
            embedding, error, faces = self.results.pop(j)
            if error:
                errors.append({"path": item.path, "label": item.label, "error": error})
                continue
            rows.append({"path": item.path, "label": item.label, **({"faces": faces} if self.faces else {})})
            vectors.append(embedding)
        x = np.stack(vectors) if vectors else np.zeros((0, self.dim), np.float32)
        self.output.write(i, x, rows, errors)
