"""MicroBatcher: single submissions -> batches -> one call per batch -> one row per caller.

Batches form from whatever is waiting when the previous batch finishes, so a lone request on an
idle server runs at once, while concurrent requests share forward passes. When a burst is under
way (two or more waiting) it may wait up to ``max_wait_ms`` more to fill the batch. The queue is
bounded: a full queue raises ``Overloaded`` instead of growing without limit. A caller that gives
up (cancelled) never breaks its batch-mates.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence

import numpy as np

from .errors import Overloaded


class MicroBatcher:
    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch_size: int = 32,
                 max_wait_ms: float = 2.0, max_queue: int = 1024,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_ms >= 0")
        self.fn, self.max_batch_size, self.max_wait = fn, max_batch_size, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch  # called with each batch's size (metrics)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue and not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(Overloaded("server is shutting down; retry on another instance"))

    async def submit(self, item: np.ndarray) -> Any:
        """Queue one input; returns its row of ``fn``'s output."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise Overloaded(f"{self.max_queue} requests are already queued; retry in a moment") from None
        return await future

    async def _collect(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        batch = [await self._queue.get()]
        while len(batch) < self.max_batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        if 1 < len(batch) < self.max_batch_size and self.max_wait > 0:  # a burst: fill up a little more
            deadline = asyncio.get_running_loop().time() + self.max_wait
            while len(batch) < self.max_batch_size:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
        return [(item, future) for item, future in batch if not future.cancelled()]

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if batch:
                await self._dispatch(batch)

    async def _dispatch(self, batch: Sequence[tuple[np.ndarray, asyncio.Future]]) -> None:
        if self.on_batch:
            self.on_batch(len(batch))
        try:
            rows = await asyncio.to_thread(self.fn, np.stack([item for item, _ in batch]))
            if len(rows) != len(batch):
                raise RuntimeError(f"batch function returned {len(rows)} rows for {len(batch)} inputs")
        except Exception as exc:  # every waiting caller gets the failure, none hangs
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), row in zip(batch, rows):
            if not future.done():  # a caller that gave up is skipped
                future.set_result(row)
