"""When to calibrate a recognizer's open-set thresholds, and with what; never on a query's path
once a first threshold exists.

A calibrated threshold belongs to the *space* it was computed in: (gallery version, adapter
generation). Given an executor, a space that moved on keeps answering with its last threshold while
the new one is computed in the background, on a snapshot: reads and writes never wait for calibration.
Only the very first calibration of a (head, false-accept rate) is computed by the query that asks for
it, once. Background runs are spaced so that they take at most ``DUTY`` of the time under a steady
stream of enrollments. Without an executor (library use, tests) every threshold is recomputed in the
caller and is always current.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Executor
from typing import Callable

from .calibration import Calibration
from .errors import EmptyGallery, GalleryClosed

DUTY = 0.05  # background calibration may run at most this share of the time, per head and rate
log = logging.getLogger("fewshot")

Space = tuple[int, int]  # (gallery version, adapter generation)
Calibrations = dict[str, Calibration]  # by statistic


class Thresholds:
    def __init__(self, calibrate: Callable[[tuple], tuple[Space, Calibrations]], current: Callable[[], Space],
                 background: Executor | None, name: str) -> None:
        """``calibrate(key)``: (the space it read, its Calibration per statistic), for a key (head, far);
        ``current()``: the space as it is now; ``name``: the gallery's, for the log."""
        self._calibrate, self._current, self.background, self.name = calibrate, current, background, name
        self._lock = threading.Lock()
        self._first = threading.Lock()  # a key's first calibration is computed once, not by every query
        self._known: dict[tuple, tuple[Space, Calibrations]] = {}
        self._pending: set[tuple] = set()
        self._not_before: dict[tuple, float] = {}

    def get(self, key: tuple) -> tuple[Space, Calibrations]:
        """The last calibration of ``key``, computed now if there is none (or if there is no executor
        and the space moved on), else renewed in the background when it is stale."""
        with self._lock:
            known = self._known.get(key)
        if known is None:
            with self._first:
                with self._lock:
                    known = self._known.get(key)
                if known is None:
                    known = self._compute(key)
        elif known[0] != self._current():
            if self.background is None:
                known = self._compute(key)
            else:
                self._refresh(key)
        return known

    def clear(self) -> None:
        """Forget every threshold (their space is gone: another adapter)."""
        with self._lock:
            self._known.clear()

    def _compute(self, key: tuple) -> tuple[Space, Calibrations]:
        result = self._calibrate(key)
        with self._lock:
            current = self._known.get(key)
            if result[0][1] == self._current()[1] and (current is None or current[0] <= result[0]):
                self._known[key] = result
        return result

    def _refresh(self, key: tuple) -> None:
        """Recompute ``key``'s threshold in the background, unless one is running or it is too soon."""
        with self._lock:
            if key in self._pending or time.monotonic() < self._not_before.get(key, 0.0):
                return
            self._pending.add(key)

        def run() -> None:
            started = time.monotonic()
            try:
                self._compute(key)
            except (GalleryClosed, EmptyGallery):
                pass  # the gallery went away or emptied meanwhile: nothing to calibrate
            except Exception:  # a background failure must not vanish silently
                log.exception("calibrating gallery %s failed", self.name)
            finally:
                took = time.monotonic() - started
                with self._lock:
                    self._pending.discard(key)
                    self._not_before[key] = time.monotonic() + took * (1 - DUTY) / DUTY

        self.background.submit(run)
