"""``fewshot serve``: settings from FEWSHOT_* variables, overridden by the command's flags.

The library's command line knows nothing of the service: this module adds its ``serve`` command
through the ``fewshot.commands`` entry point (see pyproject.toml).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(commands) -> None:
    """Add ``serve`` to the ``fewshot`` command's sub-commands."""
    serve = commands.add_parser("serve", help="start the REST service (settings: FEWSHOT_* variables)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", type=Path, default=None, help="where galleries live (default ./data)")
    serve.add_argument("--database-url", default=None, metavar="postgresql://...",
                       help="keep galleries in this PostgreSQL database, shared by every replica "
                            "(FEWSHOT_DATABASE_URL); default: SQLite files in --data-dir")
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    return run(args.host, args.port, args.data_dir, database_url=args.database_url)


def run(host: str, port: int, data_dir: Path | None, log_level: str = "info", database_url: str | None = None) -> int:
    import uvicorn
    from pydantic import ValidationError

    from .config import Settings
    from .main import create_app

    try:
        given = {"data_dir": data_dir, "database_url": database_url}
        settings = Settings(**{key: value for key, value in given.items() if value})
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            print(f"fewshot serve: error: {where + ': ' if where else ''}{error['msg'].removeprefix('Value error, ')}",
                  file=sys.stderr)
        return 2
    if settings.database_url:  # say plainly, before the server starts, when the database is not there
        from fewshot.errors import FewShotError
        from fewshot.stores import open_home

        try:
            open_home(settings.database_url).close()  # reachable (waiting a while for it), schema migrated
        except FewShotError as exc:
            print(f"fewshot serve: error: {exc}", file=sys.stderr)
            return 2
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
    return 0
