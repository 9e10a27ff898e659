"""Even load over the processes of `fewshot serve --workers N`.

The kernel hands each new connection to whichever worker accepts first, and every worker's event loop
accepts at once (the work runs in threads), so connections opened together (a client pool, a proxy)
split unevenly and stay so: at 640x480 with 16 clients on 2 workers a request took from 40 ms (the
lighter worker) to 250 ms (the busier). So the workers share a small table, one int64 per worker (a
file mapped into each): its requests in flight. A worker that holds at least ``SLACK`` more than the
least busy one answers with ``Connection: close``; the client reconnects, and the kernel gives the new
connection to a worker at random, until the loads are within ``SLACK``.

A worker claims its slot with a byte-range lock on the file, held for its life: a worker that dies
frees its slot for the one uvicorn starts in its place, which zeroes it.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np

SLACK = 2  # in-flight requests a worker may hold above the least busy before it sheds a connection
SLOT = 8  # bytes per worker: one int64


def create_table(workers: int) -> Path:
    """The file the workers share, made by the parent (`fewshot serve`) before it starts them."""
    handle, path = tempfile.mkstemp(prefix="fewshot-balance-", suffix=".bin")
    os.write(handle, bytes(SLOT * workers))
    os.close(handle)
    return Path(path)


class Balance:
    """This worker's view of the shared table."""

    def __init__(self, path: str | Path) -> None:
        self.file = open(path, "r+b")
        self.workers = os.fstat(self.file.fileno()).st_size // SLOT
        self.slot = self._claim()
        self.map = mmap.mmap(self.file.fileno(), SLOT * self.workers)
        self.table = np.frombuffer(self.map, dtype=np.int64)
        self.table[self.slot] = 0

    def _claim(self) -> int:
        for slot in range(self.workers):
            try:
                fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB, SLOT, slot * SLOT)
                return slot
            except OSError:
                continue
        raise RuntimeError(f"every slot of {self.file.name} is held: more workers than it was made for")

    def begin(self) -> None:
        self.table[self.slot] += 1  # only this process writes its slot

    def end(self) -> None:
        self.table[self.slot] -= 1

    def overloaded(self) -> bool:
        """Whether this worker holds at least SLACK more requests in flight than the least busy one."""
        loads = self.table.copy()
        return loads[self.slot] >= loads.min() + SLACK
