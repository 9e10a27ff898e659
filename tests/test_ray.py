"""The ray engine on a local Ray instance (2 CPUs, shared by these tests): the same rows as the local
engine on real images, bad files reported, kill-and-resume without duplicate or missing rows, the
Parquet layout read back by load_embedded / iter_embedded / eval, and `fewshot gallery import`
into a gallery that a running service then recognises from, without a restart."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[dev]')")

from fastapi.testclient import TestClient  # noqa: E402

from fewshot import embed_dataset, iter_embedded, load_embedded  # noqa: E402
from fewshot.cli import main as cli  # noqa: E402
from fewshot.datasets import export_omniglot  # noqa: E402
from fewshot.errors import FingerprintMismatch, OutputConflict  # noqa: E402
from fewshot.gallery_store import GalleryStore  # noqa: E402
from fewshot.ray_engine import embed_dataset_ray  # noqa: E402
from fewshot.transfer import export_gallery, import_embedded  # noqa: E402

from .conftest import SHARED_DATA  # noqa: E402

OMNIGLOT = SHARED_DATA / "omniglot" / "images_evaluation.npz"
pytestmark = pytest.mark.skipif(not OMNIGLOT.is_file(),
                                reason=f"real images absent: {OMNIGLOT} (see shared/data/PROVENANCE.md)")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """300 real Omniglot drawings (15 characters x 20 drawers), plus one truncated and one non-image file."""
    root = export_omniglot(OMNIGLOT, tmp_path_factory.mktemp("omniglot"), classes=15)
    first = sorted(root.rglob("*.png"))[0]
    (first.parent / "zz-truncated.png").write_bytes(first.read_bytes()[:300])
    (first.parent / "zz-not-an-image.jpg").write_bytes(b"hello")
    return root


@pytest.fixture(scope="module")
def local_out(images, tmp_path_factory, encoder):
    return embed_dataset(images, tmp_path_factory.mktemp("local") / "out", encoder, progress=False).out


@pytest.fixture(scope="module")
def ray_out(images, tmp_path_factory, ray_cluster, cache_dir):
    out = tmp_path_factory.mktemp("ray") / "out"
    report = embed_dataset_ray(images, out, "efficientnet_lite0", cache_dir=cache_dir, progress=False)
    assert (report.count, report.errors) == (300, 2)
    return out


def test_ray_engine_gives_the_local_engines_rows(local_out, ray_out):
    a, rows_a, meta_a = load_embedded(local_out)
    b, rows_b, meta_b = load_embedded(ray_out)
    assert (meta_a["format"], meta_b["format"], meta_b["engine"]) == ("npy", "parquet", "ray")
    assert [(r["path"], r["label"]) for r in rows_a] == [(r["path"], r["label"]) for r in rows_b]
    assert [r["row"] for r in rows_b] == list(range(300))
    assert np.sum(np.asarray(a) * b, axis=1).min() >= 0.9999
    errors = [json.loads(line) for line in (ray_out / "errors.jsonl").read_text().splitlines()]
    assert sorted(Path(e["path"]).name for e in errors) == ["zz-not-an-image.jpg", "zz-truncated.png"]
    assert all(e["error"] for e in errors)
    assert sorted(p.name for p in ray_out.iterdir()) == ["errors.jsonl", "job.json", "job.lock", "meta.json", "parts"]


def test_parquet_is_read_in_bounded_batches_and_by_eval(ray_out, capsys):
    batches = list(iter_embedded(ray_out, batch_rows=64))
    assert [len(rows) for _, rows in batches] == [64] * 4 + [44]
    assert [r["row"] for _, rows in batches for r in rows] == list(range(300))
    assert cli(["eval", str(ray_out), "--ways", "5", "--episodes", "50", "--queries", "5"]) == 0
    assert "5-way 1-shot" in capsys.readouterr().out
    import pyarrow.parquet as pq

    table = pq.read_table(ray_out / "parts")  # any Parquet reader takes the folder as one table
    kind = table.schema.field("embedding").type
    assert table.num_rows == 300 and (kind.list_size, str(kind.value_type)) == (1280, "float")


def test_same_job_finished_is_not_redone_and_another_is_refused(images, ray_out, ray_cluster, cache_dir, tmp_path):
    again = embed_dataset_ray(images, ray_out, "efficientnet_lite0", cache_dir=cache_dir, progress=False)
    assert again.already_done and again.count == 300
    with pytest.raises(OutputConflict, match="another embedding job"):
        embed_dataset_ray(images, ray_out, "efficientnet_lite0", cache_dir=cache_dir, format="npy", progress=False)


def test_killed_driver_resumes_without_duplicate_or_missing_rows(images, ray_out, ray_cluster, cache_dir, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "fewshot.cli", "embed", str(images), str(out), "--engine", "ray",
            "--cache-dir", str(cache_dir), "--shard-size", "16", "--quiet"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(list((out / "parts").glob("part-*.parquet"))) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the ray job made no progress"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started, at once
    proc.communicate(timeout=60)
    assert not (out / "meta.json").exists(), "the job finished before it could be killed"
    done = len(list((out / "parts").glob("part-*.parquet")))
    report = embed_dataset_ray(images, out, "efficientnet_lite0", cache_dir=cache_dir, shard_size=16,
                               progress=False)  # the same job, resumed on the tests' Ray instance
    assert report.resumed_shards == done and (report.count, report.errors) == (300, 2)
    resumed, rows, _ = load_embedded(out)
    reference, ref_rows, _ = load_embedded(ray_out)
    assert [r["path"] for r in rows] == [r["path"] for r in ref_rows]  # each image once, in order
    assert [r["row"] for r in rows] == list(range(300))
    assert np.sum(resumed * reference, axis=1).min() >= 0.9999


def test_a_worker_killed_mid_run_is_retried_by_ray(images, ray_cluster, cache_dir, tmp_path):
    import threading

    import psutil

    killed = []

    def kill_a_decoder() -> None:
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for process in psutil.process_iter(["cmdline"]):
                if any("_decode_block" in part for part in (process.info["cmdline"] or [])):
                    process.kill()
                    killed.append(process.pid)
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_decoder)
    killer.start()
    report = embed_dataset_ray(images, tmp_path / "out", "efficientnet_lite0", cache_dir=cache_dir, progress=False)
    killer.join()
    assert killed, "no decode worker was seen to kill"
    assert (report.count, report.errors) == (300, 2)
    _, rows, _ = load_embedded(tmp_path / "out")
    assert [r["row"] for r in rows] == list(range(300)) and len({r["path"] for r in rows}) == 300


def test_gallery_import_reaches_a_running_service_without_restart(ray_out, tmp_path, encoder):
    from fewshot_service.config import Settings
    from fewshot_service.main import create_app

    vectors, rows, meta = load_embedded(ray_out)
    first = [i for i, r in enumerate(rows) if r["label"].endswith(("0965", "0966"))]
    data = tmp_path / "galleries"
    store = GalleryStore(data)  # the CLI's handle: another connection, as another process has
    # half of OUT first (its first two characters), into a gallery the service then opens
    half = tmp_path / "half"
    export = GalleryStore(tmp_path / "tmp")
    export.get("half", meta["dim"], meta["fingerprint"], meta["encoder"], create=True).add_many(
        [rows[i]["label"] for i in first], vectors[first], [{"source": rows[i]["path"]} for i in first])
    export_gallery(export, "half", half, progress=False)
    export.close()
    import_embedded(store, half, "omni", progress=False)
    settings = Settings(data_dir=data, encoders="efficientnet_lite0")
    with TestClient(create_app(settings, encoder=encoder)) as c:
        asked = c.post("/v1/galleries/omni/recognize/embedding", json={"vectors": [vectors[first[0]].tolist()]})
        assert asked.status_code == 200, asked.text
        # now everything, through the CLI, while the service runs; the rows already there are not doubled
        assert cli(["gallery", "import", str(ray_out), "--gallery", "omni", "--data-dir", str(data), "--quiet"]) == 0
        report = import_embedded(store, ray_out, "omni", progress=False)
        assert (report.imported, report.already) == (0, 300)
        late = [i for i, r in enumerate(rows) if r["label"].endswith("0979")]
        answer = c.post("/v1/galleries/omni/recognize/embedding", json={"vectors": [vectors[late[3]].tolist()]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0]["matches"][0]["label"] == rows[late[3]]["label"]
        classes = c.get("/v1/galleries/omni/classes").json()
        assert sum(k["count"] for k in classes["classes"]) == 300 + len(first)
    store.close()
    with pytest.raises(FingerprintMismatch):
        other = GalleryStore(data)
        other.get("other", 8, "another-encoder", "x", create=True)
        import_embedded(other, ray_out, "other", progress=False)
