"""Settings, read once at the edge from FEWSHOT_* environment variables (or passed in)."""
from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEWSHOT_")

    data_dir: Path = Path("data")
    encoder: str = "efficientnet_lite0"
    device: str = "auto"
    runtime: str = "auto"  # auto | torch | onnx | onnx-int8 (needs calibration)
    calibration: Path | None = None  # images like the queries, for the onnx-int8 runtime
    cache_dir: Path | None = None
    max_batch_size: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 256
    max_request_bytes: int = 32 * 1024 * 1024
    max_images_per_request: int = 32
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    decode_threads: int = 2
    default_far: float = 0.01
    admin_key: str | None = None  # writes need it when set
    read_key: str | None = None  # queries need it (or the admin key) when set
