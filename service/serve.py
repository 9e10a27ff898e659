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
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    return run(args.host, args.port, args.data_dir)


def run(host: str, port: int, data_dir: Path | None, log_level: str = "info") -> int:
    import uvicorn
    from pydantic import ValidationError

    from .config import Settings
    from .main import create_app

    try:
        settings = Settings(**({"data_dir": data_dir} if data_dir else {}))
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            print(f"fewshot serve: error: {where + ': ' if where else ''}{error['msg'].removeprefix('Value error, ')}",
                  file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
    return 0
