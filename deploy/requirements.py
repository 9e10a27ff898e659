"""The requirements of one install of fewshot, read from pyproject.toml (the one list of them):

    python3 deploy/requirements.py build    # everything the image's build stage needs (torch, to export)
    python3 deploy/requirements.py serve    # what serving needs: the same without the torch stack

Extras named after the set (``face``, ``postgres``) are included in both. The serving set leaves out
what only exporting, fine-tuning and adapting import (``fewshot.runtimes.TORCH_PACKAGES``).
"""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

EXTRAS = ("face", "postgres")
TRAINING_ONLY = {"torch", "torchvision", "timm", "open-clip-torch", "safetensors"}


def requirements(which: str, pyproject: Path = Path(__file__).resolve().parents[1] / "pyproject.toml") -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in EXTRAS:
        wanted += project["optional-dependencies"][extra]
    if which == "serve":
        wanted = [r for r in wanted if _name(r) not in TRAINING_ONLY]
    return wanted


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("build", "serve"):
        sys.exit("usage: python3 deploy/requirements.py build|serve")
    print("\n".join(requirements(sys.argv[1])))
