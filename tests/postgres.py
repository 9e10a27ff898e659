"""A throwaway PostgreSQL server for tests and benchmarks: Debian's packages, a temporary directory,
an unprivileged user (PostgreSQL refuses to run as root), a Unix socket, no password."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

INSTALL = "apt-get install postgresql-15 (Debian), or put PostgreSQL's bin directory on PATH"


def binaries() -> Path | None:
    """The directory holding initdb and pg_ctl, or None."""
    found = shutil.which("initdb") or shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


class TempPostgres:
    """``with TempPostgres() as pg: pg.url("dbname")``. ``restart()`` and ``stop()``/``start()`` for fault tests."""

    def __init__(self, port: int = 54329, tcp: bool = False) -> None:
        self.bin = binaries()
        if self.bin is None:
            raise RuntimeError(f"PostgreSQL is not installed: {INSTALL}")
        self.port, self.tcp = port, tcp
        self.dir = Path(tempfile.mkdtemp(prefix="fewshot-pg-"))
        os.chmod(self.dir, 0o777)  # the unprivileged server user writes its socket and log here
        self.data = self.dir / "db"
        self.user = "nobody" if os.geteuid() == 0 else None
        self._run(["initdb", "-D", str(self.data), "-A", "trust", "-U", "fewshot", "-E", "UTF8", "--locale=C.UTF-8"])
        with open(self.data / "postgresql.auto.conf", "a") as conf:  # read on every start and restart
            conf.write(f"unix_socket_directories = '{self.dir}'\nport = {port}\n"
                       f"listen_addresses = '{'127.0.0.1' if tcp else ''}'\nmax_connections = 200\n")
        self.start()

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        argv = [str(self.bin / argv[0]), *argv[1:]]
        if self.user:
            argv = ["runuser", "-u", self.user, "--", *argv]
        return subprocess.run(argv, check=check, capture_output=True, text=True)

    def start(self) -> None:
        self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "start"])

    def stop(self, mode: str = "fast") -> None:
        self._run(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"], check=False)

    def restart(self) -> None:
        self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-m", "fast", "-w", "restart"])

    def url(self, database: str = "postgres") -> str:
        if self.tcp:
            return f"postgresql://fewshot@127.0.0.1:{self.port}/{database}"
        return f"postgresql://fewshot@/{database}?host={self.dir}&port={self.port}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # a name we made: identifiers cannot be bound
        return self.url(name)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "TempPostgres":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_ready(pg: TempPostgres, seconds: float = 10.0) -> None:
    import psycopg

    deadline = time.monotonic() + seconds
    while True:
        try:
            psycopg.connect(pg.url(), connect_timeout=1).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
