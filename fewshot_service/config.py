"""Settings, read once at the edge from FEWSHOT_* environment variables (or passed in)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEWSHOT_")

    data_dir: Path = Path("data")
    database_url: str | None = None  # postgresql://...: galleries in PostgreSQL, shared by replicas (else data_dir)
    encoder: str = "efficientnet_lite0"  # new galleries' encoder unless they choose; loaded at start
    encoders: str = "efficientnet_lite0,face,face:cnn"  # the encoders galleries may choose (comma-separated)
    device: str = "auto"
    runtime: str = "auto"  # auto | torch | onnx | onnx-int8 (needs calibration)
    calibration: Path | None = None  # images like the queries, for the onnx-int8 runtime
    cache_dir: Path | None = None
    # 0: 16 on the CPU (ONNX Runtime keeps the largest batch's activations: ~25 MB per image for the default
    # encoder; 32 cost 1.7 GB across 2 workers in the storm benchmark, for no more throughput), 128 on CUDA
    max_batch_size: int = 0
    max_wait_ms: float = 2.0
    max_queue: int = 256
    max_request_bytes: int = 32 * 1024 * 1024
    max_images_per_request: int = 32
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_vectors_per_request: int = 256  # recognize/embedding
    max_vector_request_bytes: int = 8 * 1024 * 1024  # its JSON body: ~256 x 1280 floats as text
    max_open_galleries: int = 64  # least recently used idle galleries are closed past this
    max_adapt_jobs: int = 1  # adapt jobs running at once (each takes a core); more get 429
    keep_images: Literal["original", "thumbnail", "none"] = "original"  # kept with each enrolled example
    decode_threads: int = 2
    workers: int | None = None  # server processes (`fewshot serve --workers`); None: one per core
    threads: int | None = None  # the encoder's threads in each process; None: the cores / the processes
    balance_table: Path | None = None  # set by `fewshot serve --workers N` for its workers (fewshot_service.balance)
    max_uploads: int = 64  # request bodies received at once; more get 503 at once
    max_bytes_in_flight: int = 256 * 1024 * 1024  # request bodies held at once (by Content-Length); then 503
    max_images_in_flight: int = 128  # images decoding, embedding or being scored; more get 503 at once
    body_timeout_s: float = 30.0  # a request body must arrive within this (408 past it)
    default_far: float = 0.01
    face_min_score: float = 0.2  # the detector score a face must reach to be enrolled (request: min_score=)
    admin_key: str | None = None  # when any key is set, every write needs this one
    read_key: str | None = None  # queries and /metrics need it (or the admin key) when set

    def processes(self) -> int:
        """How many server processes `fewshot serve` runs: ``workers``, else one per core it may use."""
        from fewshot.runtimes import owned_cores

        return max(1, self.workers or owned_cores())

    @model_validator(mode="after")
    def _database_is_postgresql(self) -> "Settings":
        if self.database_url and not self.database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("FEWSHOT_DATABASE_URL must be a PostgreSQL URL (postgresql://user:password@host:5432/"
                             "database); leave it unset to keep galleries as SQLite files in FEWSHOT_DATA_DIR")
        return self

    @model_validator(mode="after")
    def _keys_are_whole(self) -> "Settings":
        if self.read_key and not self.admin_key:
            raise ValueError("FEWSHOT_READ_KEY is set without FEWSHOT_ADMIN_KEY: reads would need a key while "
                             "anyone could enroll and delete. Set FEWSHOT_ADMIN_KEY too (writes need it), or "
                             "unset FEWSHOT_READ_KEY")
        return self
