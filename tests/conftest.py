"""Shared fixtures: the real default encoder (exported to ONNX once per session) and real photos."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot import create_encoder

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fewshot-cache")


@pytest.fixture(scope="session")
def encoder(cache_dir):
    """The default encoder on ONNX Runtime (what the CPU gets by default)."""
    return create_encoder("efficientnet_lite0", device="cpu", runtime="onnx", cache_dir=cache_dir)


@pytest.fixture(scope="session")
def torch_encoder(cache_dir):
    """The same weights on PyTorch fp32: the reference the ONNX runtime must match."""
    return create_encoder("efficientnet_lite0", device="cpu", runtime="torch", cache_dir=cache_dir)


def photo(name: str) -> Image.Image:
    """A real photograph shipped by scikit-image (chelsea is a cat, coffee a cup, ...)."""
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def jpeg_bytes(image: Image.Image, size: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    (image.resize(size) if size else image).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    return {name: photo(name) for name in ["chelsea", "astronaut", "coffee", "rocket", "cat", "camera"]}


def make_image_tree(root: Path, per_class: int = 3, corrupt: bool = True) -> Path:
    """root/<label>/<n>.jpg from real photos (random crops), plus one corrupt .jpg if asked."""
    rng = np.random.default_rng(0)
    for name in ["chelsea", "astronaut", "coffee"]:
        image = photo(name)
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            w, h = image.size
            cw, ch = int(w * 0.8), int(h * 0.8)
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            (root / name / f"{j:02d}.jpg").write_bytes(jpeg_bytes(image.crop((x, y, x + cw, y + ch)), (320, 240)))
    if corrupt:
        (root / "coffee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return root


def serve_in_thread(app):
    """Run ``app`` under uvicorn on a free loopback port in a thread: (stop function, base URL)."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    return stop, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the session (Debian's packages, a temp dir, an unprivileged user)."""
    from .postgres import INSTALL, TempPostgres, binaries

    if binaries() is None:
        pytest.skip(f"PostgreSQL is not installed here: {INSTALL} (.ci/run installs it)")
    pytest.importorskip("psycopg", reason="psycopg is missing: pip install -e '.[dev]'")
    with TempPostgres() as pg:
        yield pg


@pytest.fixture
def database_url(postgres) -> str:
    """A fresh, empty database on the session's server."""
    return postgres.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    """Where a gallery store lives: a data directory (SQLite) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "galleries"
    return request.getfixturevalue("database_url")
