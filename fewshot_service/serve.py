"""``fewshot serve``: settings from FEWSHOT_* variables, overridden by the command's flags.

The library's command line knows nothing of the service: this module adds its ``serve`` command
through the ``fewshot.commands`` entry point (see pyproject.toml).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(commands) -> None:
    """Add ``serve`` to the ``fewshot`` command's sub-commands."""
    serve = commands.add_parser("serve", help="start the REST service (settings: FEWSHOT_* variables)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0: every interface, e.g. in a container)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port to listen on, 1-65535")
    serve.add_argument("--data-dir", type=Path, default=None, help="where galleries live (default ./data)")
    serve.add_argument("--database-url", default=None, metavar="postgresql://...",
                       help="keep galleries in this PostgreSQL database, shared by every replica "
                            "(FEWSHOT_DATABASE_URL); default: SQLite files in --data-dir")
    serve.add_argument("--workers", type=int, default=None,
                       help="server processes sharing the port and the galleries (each follows the others' writes "
                            "through the change log), the encoder's threads divided among them (default: one per "
                            "core this process may use; FEWSHOT_WORKERS)")
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    return run(args.host, args.port, args.data_dir, database_url=args.database_url, workers=args.workers)


def run(host: str, port: int, data_dir: Path | None, log_level: str = "info", database_url: str | None = None,
        workers: int | None = None) -> int:
    import uvicorn
    from pydantic import ValidationError

    from .config import Settings
    from .main import create_app

    try:
        given = {"data_dir": data_dir, "database_url": database_url, "workers": workers}
        settings = Settings(**{key: value for key, value in given.items() if value})
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            print(f"fewshot serve: error: {where + ': ' if where else ''}{error['msg'].removeprefix('Value error, ')}",
                  file=sys.stderr)
        return 2
    problem = startup_problem(settings, host, port)
    if problem:
        print(f"fewshot serve: error: {problem}", file=sys.stderr)
        return 2
    processes = settings.processes()
    if processes == 1:
        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
        return 0
    # Each worker process builds its own app from FEWSHOT_* (what the flags said is passed on that way)
    os.environ.update({f"FEWSHOT_{key.upper()}": str(value) for key, value in given.items() if value})
    from fewshot.runtimes import owned_cores

    os.environ["FEWSHOT_THREADS"] = str(settings.threads or max(1, owned_cores() // processes))
    os.environ["FEWSHOT_WORKERS"] = str(processes)  # each knows it is one of several
    # The server's budgets are the machine's: each process takes its share of them
    for key in ("max_images_in_flight", "max_bytes_in_flight", "max_uploads"):
        os.environ[f"FEWSHOT_{key.upper()}"] = str(max(1, getattr(settings, key) // processes))
    from .balance import create_table

    table = create_table(processes)  # the workers' loads, so that connections drift to the least busy
    os.environ["FEWSHOT_BALANCE_TABLE"] = str(table)
    try:
        uvicorn.run("fewshot_service.main:create_app", factory=True, host=host, port=port, workers=processes,
                    log_level=log_level)
    finally:
        table.unlink(missing_ok=True)
    return 0


DATABASE_WAIT = 5.0  # seconds `fewshot serve` waits for its database before saying it is not there


def startup_problem(settings, host: str, port: int) -> str | None:
    """What stops this server from starting, in one line saying what to change, found before any model
    is loaded: the encoders, the data directory, the port, the database. None if nothing does."""
    from fewshot.backbones import parse_spec
    from fewshot.errors import FewShotError, UnknownEncoder

    try:
        parse_spec(settings.encoder)
    except FewShotError as exc:
        return f"FEWSHOT_ENCODER={settings.encoder!r}: {exc}"
    for name in (n.strip() for n in settings.encoders.split(",") if n.strip()):
        try:
            parse_spec(name)
        except UnknownEncoder as exc:
            return f"FEWSHOT_ENCODERS lists {name!r}: {exc}"
        except FewShotError:
            pass  # known, but its weights load on first use: a gallery choosing it is told then
    if not settings.database_url and (problem := _unwritable(Path(settings.data_dir))):
        return problem
    if problem := _port_taken(host, port):
        return problem
    if settings.database_url:
        from fewshot.stores import open_home

        try:
            open_home(settings.database_url, wait=DATABASE_WAIT).close()  # reachable, schema migrated
        except FewShotError as exc:
            return str(exc)
    return None


def _unwritable(folder: Path) -> str | None:
    """Checked by writing: a directory that exists but is not ours (a root-owned bind mount) says so only then."""
    import os

    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return (f"the data directory {folder} cannot be written by this user (uid {os.getuid()}): "
                f"{exc.strerror}. Make it writable (`sudo chown -R {os.getuid()} {folder}`; for a container, on the "
                "host's directory mounted there, or run it with --user $(id -u)) or pass --data-dir")
    return None


def _port_taken(host: str, port: int) -> str | None:
    import socket

    if not 1 <= port <= 65535:
        return f"--port {port} is out of range: use 1-65535"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror}. Stop what uses it or pass --port"
    return None
