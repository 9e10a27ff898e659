"""MicroBatcher: concurrent submits share calls; lone ones do not wait; failures reach everyone."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from fewshot.batching import MicroBatcher
from fewshot.errors import Overloaded


class Spy:
    """Doubles its input and records each batch size; optionally slow, to let a queue build up."""

    def __init__(self, delay: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.gate.wait()
        self.sizes.append(len(batch))
        time.sleep(self.delay)
        return batch * 2


async def started(fn, **kwargs) -> MicroBatcher:
    batcher = MicroBatcher(fn, **kwargs)
    await batcher.start()
    return batcher


def test_concurrent_submits_share_forward_passes():
    async def main():
        spy = Spy(delay=0.02)
        batcher = await started(spy, max_batch_size=8, max_wait_ms=5)
        results = await asyncio.gather(*(batcher.submit(np.full(3, i, np.float32)) for i in range(16)))
        await batcher.stop()
        return spy, results

    spy, results = asyncio.run(main())
    assert [r[0] for r in results] == [2 * i for i in range(16)]  # each caller gets its own row
    assert sum(spy.sizes) == 16 and len(spy.sizes) < 16 and max(spy.sizes) <= 8


def test_a_lone_request_does_not_wait_for_a_batch():
    async def main():
        batcher = await started(Spy(), max_batch_size=32, max_wait_ms=500)
        t = time.perf_counter()
        await batcher.submit(np.zeros(2))
        elapsed = time.perf_counter() - t
        await batcher.stop()
        return elapsed

    assert asyncio.run(main()) < 0.25  # far below the 500 ms wait a burst could use


def test_failure_reaches_every_caller_and_the_batcher_keeps_serving():
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("boom")
        return batch

    async def main():
        batcher = await started(flaky)
        first = await asyncio.gather(*(batcher.submit(np.zeros(1)) for _ in range(3)), return_exceptions=True)
        after = await batcher.submit(np.ones(1))
        await batcher.stop()
        return first, after

    first, after = asyncio.run(main())
    assert any(isinstance(r, ValueError) for r in first) and after[0] == 1


def test_wrong_row_count_fails_the_batch():
    async def main():
        batcher = await started(lambda batch: batch[:-1])  # always one row short
        results = await asyncio.gather(*(batcher.submit(np.zeros(1)) for _ in range(2)), return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "rows" in str(r) for r in results)


def test_a_caller_that_gives_up_does_not_break_its_batch_mates():
    async def main():
        spy = Spy()
        spy.gate.clear()  # hold the device so requests queue up
        batcher = await started(spy, max_batch_size=8)
        blocker = asyncio.create_task(batcher.submit(np.zeros(1)))
        await asyncio.sleep(0.05)
        quitter = asyncio.create_task(batcher.submit(np.full(1, 5.0)))
        stayers = [asyncio.create_task(batcher.submit(np.full(1, float(i)))) for i in range(3)]
        await asyncio.sleep(0.02)
        quitter.cancel()
        spy.gate.set()
        results = await asyncio.gather(blocker, *stayers)
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert [float(r[0]) for r in results] == [0.0, 0.0, 2.0, 4.0]


def test_full_queue_is_overloaded():
    async def main():
        spy = Spy()
        spy.gate.clear()
        batcher = await started(spy, max_batch_size=1, max_queue=2)
        running = asyncio.create_task(batcher.submit(np.zeros(1)))
        await asyncio.sleep(0.05)  # taken by the worker, held at the gate
        queued = [asyncio.create_task(batcher.submit(np.zeros(1))) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="retry"):
            await batcher.submit(np.zeros(1))
        spy.gate.set()
        await asyncio.gather(running, *queued)
        await batcher.stop()

    asyncio.run(main())
