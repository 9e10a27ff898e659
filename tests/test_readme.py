"""The README's first block runs on a fresh clone with nothing beside it (the install step aside)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_first_block_runs_without_shared_data(tmp_path, cache_dir):
    first, second = code_blocks()[:2]
    venv, first = first.split("\n", 1)  # a virtual environment first (not run here: this test runs in one)
    assert venv.split("#")[0].strip() == "python3 -m venv .venv && . .venv/bin/activate"
    assert first.startswith('pip install -e ".[dev]" && ') and "../shared" not in first
    assert second.strip() == "python -m pytest -q"
    clone = tmp_path / "clone"  # nothing beside it: no ../shared
    shutil.copytree(ROOT / "samples", clone / "samples")
    steps = first.strip().split(" && ")[1:]  # the install already happened: this test runs in it
    for step in steps:
        words = step.split()
        assert words[0] == "fewshot"
        run = subprocess.run([sys.executable, "-m", "fewshot.cli", *words[1:], *(
            ["--cache-dir", str(cache_dir)] if words[1] == "embed" else [])], cwd=clone, capture_output=True,
            text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    assert "3-way 1-shot" in run.stdout and "accuracy" in run.stdout
    assert (clone / "out" / "samples" / "embeddings.npy").is_file()
