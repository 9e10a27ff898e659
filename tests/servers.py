"""Real `fewshot serve` processes for tests: started, ready, killed."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int, cache_dir: Path, *args: str, env: dict | None = None,
                 command: list[str] | None = None) -> subprocess.Popen:
    """``fewshot serve`` on ``port``, returned once /readyz answers 200 (indexes built). ``command``: how
    ``fewshot`` is run (default: this interpreter's)."""
    env = {**os.environ, "FEWSHOT_CACHE_DIR": str(cache_dir), **(env or {})}
    one = [] if "--workers" in args else ["--workers", "1"]  # one process unless asked: kill -9 then kills it all
    fewshot = command or [sys.executable, "-m", "fewshot.cli"]
    proc = subprocess.Popen([*fewshot, "serve", "--port", str(port), "--data-dir",
                             str(data_dir), *one, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not become ready in 120 s")
