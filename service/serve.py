"""``fewshot serve``: settings from FEWSHOT_* variables, overridden by the command's flags."""
from __future__ import annotations

from pathlib import Path


def run(host: str, port: int, data_dir: Path | None, log_level: str = "info") -> None:
    import uvicorn

    from .config import Settings
    from .main import create_app

    settings = Settings(**({"data_dir": data_dir} if data_dir else {}))
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
