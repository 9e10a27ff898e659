"""Crash-safe file writes shared by the ONNX cache, the index snapshot, the embedding shards and
their outputs: write beside the target, then rename over it."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block succeeds it replaces ``path`` in one
    rename, so a reader (or a resumed job) sees the old file or the new, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write, fsync, rename."""
    with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` (no pickle), fsync, rename."""
    with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
