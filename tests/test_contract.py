"""The OpenAPI contract holds: Schemathesis, an independent fuzzer, against a live server with every
check on (schema-valid requests accepted, invalid ones rejected, statuses, headers and bodies as
documented, 405s with Allow). Rejections no schema can express are listed in schemathesis.toml."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fewshot_service.config import Settings
from fewshot_service.main import create_app

from .conftest import serve_in_thread
from .test_service import FakeEncoder

ROOT = Path(__file__).resolve().parents[1]
ST = shutil.which("st") or shutil.which("schemathesis")


@pytest.mark.skipif(ST is None, reason="schemathesis is not installed (the dev extra has it)")
def test_schemathesis_finds_no_failure(tmp_path):
    stop, url = serve_in_thread(create_app(Settings(data_dir=tmp_path, encoders="fake"), encoder=FakeEncoder()))
    try:
        run = subprocess.run([ST, "run", f"{url}/openapi.json", "--checks", "all", "--max-examples", "40",
                              "--seed", "1", "--no-color"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        stop()
    assert run.returncode == 0, run.stdout[-6000:]
    assert "failures" not in run.stdout.splitlines()[-1] and "generated" in run.stdout
