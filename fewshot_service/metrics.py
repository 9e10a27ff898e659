"""Prometheus text exposition, without a client library: a few counters and histograms."""
from __future__ import annotations

import os

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, cumulative = [], 0
        sep = "," if labels else ""
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        out += [f"{name}_sum{{{labels}}} {self.sum}", f"{name}_count{{{labels}}} {self.count}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latency: dict[str, Histogram] = defaultdict(lambda: Histogram(LATENCY_BUCKETS))
        self.batches = Histogram(BATCH_BUCKETS)
        self.rejections: dict[int, int] = defaultdict(int)

    def request(self, route: str, seconds: float) -> None:
        with self._lock:
            self.latency[route].observe(seconds)

    def batch(self, size: int) -> None:
        with self._lock:
            self.batches.observe(size)

    def rejected(self, status: int) -> None:
        with self._lock:
            self.rejections[status] += 1

    def render(self, queue_depth: int, gallery_sizes: dict[str, int]) -> str:
        with self._lock:
            lines = ["# TYPE fewshot_request_seconds histogram"]
            for route, histogram in sorted(self.latency.items()):
                lines += histogram.lines("fewshot_request_seconds", f'route="{route}"')
            lines += ["# TYPE fewshot_batch_size histogram", *self.batches.lines("fewshot_batch_size")]
            lines += ["# TYPE fewshot_rejected_requests_total counter"]
            lines += [f'fewshot_rejected_requests_total{{status="{status}"}} {n}'
                      for status, n in sorted(self.rejections.items())]
        lines += ["# TYPE fewshot_queue_depth gauge", f"fewshot_queue_depth {queue_depth}",
                  "# TYPE fewshot_gallery_examples gauge"]
        lines += [f'fewshot_gallery_examples{{gallery="{g}"}} {n}' for g, n in sorted(gallery_sizes.items())]
        # With `fewshot serve --workers N` each scrape is answered by one process: these figures are its own
        lines += ["# TYPE fewshot_worker_info gauge", f'fewshot_worker_info{{pid="{os.getpid()}"}} 1']
        return "\n".join(lines) + "\n"
