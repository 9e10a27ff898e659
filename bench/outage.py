"""A PostgreSQL outage under load: what queries and writes see while the database is away.

    python bench/outage.py [--outage 8] [--rounds 1]

Starts a throwaway PostgreSQL (Debian's packages, a temp dir, as in the tests) and two real
`fewshot serve` replicas on it (the embedded default encoder). 4 clients enroll (2 per replica) and 4
recognise a 224x224 JPEG (2 per replica) while the database is stopped for --outage seconds and
started again (tests/outage.py, which the test runs too). Prints, for the calls started during the
outage: recognise latency (p50 / p99 / max) and status, write latency and status, every 503's
Retry-After; then the seconds until each replica accepted a write again, and how many acknowledged
enrollments are missing from each replica afterwards.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests import outage  # noqa: E402
from tests.outage import crops  # noqa: E402
from tests.postgres import TempPostgres  # noqa: E402
from tests.servers import free_port, start_server  # noqa: E402


def ms(values: list[float]) -> str:
    if not values:
        return "none"
    p50, p99 = np.percentile(values, [50, 99])
    return f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {max(values) * 1000:.0f} ms (n={len(values)})"


def report(result: outage.Outage, bases: list[str]) -> None:
    queries, writes = result.during("recognize"), result.during("enroll")
    print(f"recognise during the outage: {ms([c.seconds for c in queries])}; statuses "
          f"{sorted({c.status for c in queries})}; wrong answers "
          f"{sum(c.label != 'coffee' for c in result.calls if c.kind == 'recognize' and c.status == 200)}")
    print(f"writes during the outage: {ms([c.seconds for c in writes])}; statuses "
          f"{ {s: sum(c.status == s for c in writes) for s in sorted({c.status for c in writes})} }; 503s without "
          f"Retry-After: {sum(c.status == 503 and not c.retry_after for c in writes)}")
    print("writes accepted again after: " + ", ".join(f"{s:.2f} s" for s in result.recovered_after()))
    acknowledged = result.acknowledged()
    for i, base in enumerate(bases):
        time.sleep(1.0)  # the listener's catch-up after reconnecting
        stored = set(httpx.get(f"{base}/v1/galleries/faults/classes/astronaut", timeout=30).json()["ids"])
        print(f"replica {i}: {len(acknowledged)} acknowledged, {len(acknowledged - stored)} missing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--outage", type=float, default=8.0, help="seconds the database is stopped (default 8)")
    parser.add_argument("--rounds", type=int, default=1, help="outages in a row (default 1)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fewshot-outage-"))
    cache = Path(os.environ.get("FEWSHOT_CACHE_DIR", work / "cache"))
    with TempPostgres(port=free_port()) as pg:
        url = pg.new_database()
        ports = [free_port(), free_port()]
        procs = [start_server(work / f"r{i}", port, cache, "--database-url", url) for i, port in enumerate(ports)]
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        try:
            known = crops("coffee", 1, seed=4)[0]
            for label, image in [("coffee", known), ("chelsea", crops("chelsea", 1, 5)[0])]:
                httpx.post(f"{bases[0]}/v1/galleries/faults/classes/{label}/examples",
                           files=[("files", ("0.jpg", image, "image/jpeg"))], timeout=60).raise_for_status()
            for round_ in range(args.rounds):
                print(f"round {round_ + 1}: database stopped for {args.outage:g} s under 4 enrolling + 4 "
                      "recognising clients on 2 replicas")
                report(outage.run(bases, pg, "faults", known, crops("astronaut", 2000, seed=6 + round_),
                                  outage=args.outage), bases)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()
