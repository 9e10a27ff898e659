"""A serving-only install: with the encoders already exported, serving, embedding, evaluating and the
gallery commands run where torch, torchvision, timm and open_clip are not installed at all; what
needs them says so in one line.

"Not installed" is real here: the commands run in an isolated interpreter (``-I -S``) whose only
site directory is a copy of this one's, made of links, without those packages."""
from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from .conftest import jpeg_bytes, make_image_tree, photo
import fewshot
from fewshot import create_encoder
from .servers import free_port, start_server

TORCH_STACK = ("torch", "torchvision", "timm", "open_clip", "nvidia", "triton", "functorch", "torchgen")
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
PROJECT = str(Path(fewshot.__file__).resolve().parents[1])  # the code under test, wherever it is installed from
LAUNCH = (f"import site, sys; site.addsitedir(sys.argv.pop(1)); sys.path.insert(0, {PROJECT!r}); "
          "from fewshot.cli import main; sys.argv[0] = 'fewshot'; sys.exit(main())")


def _without_torch(entry: Path) -> bool:
    top = entry.name.split("-")[0].split(".")[0].lower()
    return top not in TORCH_STACK and not top.startswith(("nvidia_", "open_clip_", "torch"))


@pytest.fixture(scope="module")
def torchless(tmp_path_factory, cache_dir) -> list[str]:
    """The command line of ``fewshot`` in an interpreter without the torch stack, on a cache where the
    default encoder and the face encoder are exported (by this process, which has torch)."""
    create_encoder("efficientnet_lite0", device="cpu", runtime="onnx", cache_dir=cache_dir)
    create_encoder("face", device="cpu", runtime="onnx", cache_dir=cache_dir)
    packages = tmp_path_factory.mktemp("site-packages-without-torch")
    for folder in map(Path, site.getsitepackages()):
        for entry in folder.iterdir():
            if _without_torch(entry) and not (packages / entry.name).exists():
                (packages / entry.name).symlink_to(entry)
    return [sys.executable, "-I", "-S", "-c", LAUNCH, str(packages)]


def _run(command: list[str], *args: str, cache_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300,
                          env={"FEWSHOT_CACHE_DIR": str(cache_dir), "PATH": "/usr/bin:/bin"})
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torch_is_not_importable_there(torchless, cache_dir):
    probe = [*torchless[:4], "import site, sys; site.addsitedir(sys.argv[1]); import torch", torchless[5]]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "No module named 'torch'" in done.stderr


def test_embed_eval_and_gallery_import_run_without_torch(torchless, cache_dir, encoder, tmp_path):
    _run(torchless, "embed", "--runtime", "onnx", str(SAMPLES), str(tmp_path / "out"), cache_dir=cache_dir)
    vectors = np.load(tmp_path / "out" / "embeddings.npy")
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert vectors.shape == (6, encoder.dim)
    here = encoder.embed_images([Path(row["path"]).read_bytes() for row in rows])  # this install's, with torch
    assert np.allclose(np.sum(here * vectors[[row["row"] for row in rows]], axis=1), 1.0, atol=1e-4)
    evaluated = _run(torchless, "eval", str(tmp_path / "out"), "--ways", "3", "--shots", "1", "--queries", "1",
                     "--episodes", "10", cache_dir=cache_dir)
    assert "accuracy" in evaluated.stdout
    data = ["--data-dir", str(tmp_path / "data")]
    _run(torchless, "gallery", "import", str(tmp_path / "out"), "--gallery", "pets", *data, cache_dir=cache_dir)
    _run(torchless, "gallery", "export", "pets", str(tmp_path / "dump"), "--format", "npy", *data, cache_dir=cache_dir)
    assert np.allclose(np.load(tmp_path / "dump" / "embeddings.npy"), vectors, atol=1e-6)


def test_what_needs_torch_says_so_in_one_line(torchless, cache_dir, tmp_path):
    empty = tmp_path / "empty-cache"
    done = _run(torchless, "embed", "--cache-dir", str(empty), str(SAMPLES), str(tmp_path / "out"),
                cache_dir=empty, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "exporting the efficientnet_lite0 encoder" in done.stderr and "pip install torch" in done.stderr
    done = _run(torchless, "finetune", str(tmp_path / "none"), str(tmp_path / "ft"), cache_dir=cache_dir, check=False)
    assert done.returncode == 2 and "pip install torch" in done.stderr


def test_the_service_serves_objects_and_faces_without_torch(torchless, cache_dir, tmp_path):
    port = free_port()
    proc = start_server(tmp_path / "data", port, cache_dir, command=torchless)
    try:
        url = f"http://127.0.0.1:{port}/v1/galleries"
        for label in ("cat", "coffee", "rocket"):
            files = {"files": (SAMPLES / label / "1.jpg").read_bytes()}
            assert httpx.post(f"{url}/pets/classes/{label}/examples", files=files, timeout=60).status_code == 201
        answer = httpx.post(f"{url}/pets/recognize", files={"files": (SAMPLES / "cat" / "2.jpg").read_bytes()},
                            timeout=60).json()
        assert answer["results"][0]["matches"][0]["label"] == "cat"
        assert httpx.post(url, json={"name": "staff", "encoder": "face"}, timeout=30).status_code == 201
        astronaut = {"files": jpeg_bytes(photo("astronaut"))}
        assert httpx.post(f"{url}/staff/classes/eileen/examples", files=astronaut, timeout=60).status_code == 201
        faces = httpx.post(f"{url}/staff/recognize", files=astronaut, timeout=60).json()["results"]
        assert faces[0]["matches"][0]["label"] == "eileen" and not faces[0]["unknown"]
        assert httpx.post(url, json={"name": "door", "encoder": "face:cnn"}, timeout=30).status_code == 201
        assert httpx.post(f"{url}/door/classes/eileen/examples", files=astronaut, timeout=60).status_code == 201
        faces = httpx.post(f"{url}/door/recognize", files=astronaut, timeout=60).json()["results"]
        assert len(faces) == 1 and faces[0]["matches"][0]["label"] == "eileen"  # the CNN: her face, no patch
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch" not in maps and "onnxruntime" in maps
    finally:
        proc.kill()
        proc.wait(30)


def test_int8_is_quantised_without_torch(torchless, cache_dir, tmp_path):
    """onnx-int8 needs the user's calibration images, so no install ships it: quantising at first use
    runs on ONNX Runtime's tools alone."""
    calibration = make_image_tree(tmp_path / "calibration", per_class=3, corrupt=False)
    done = _run(torchless, "embed", "--runtime", "onnx-int8", "--calibration", str(calibration),
                "--cache-dir", str(cache_dir), str(SAMPLES), str(tmp_path / "out"), cache_dir=cache_dir)
    assert "runtime=onnx-int8" in done.stdout + done.stderr
    assert np.load(tmp_path / "out" / "embeddings.npy").shape[0] == 6
