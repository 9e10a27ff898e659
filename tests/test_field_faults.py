"""Faults found in the field: labels that stay reachable and mean one thing, base64 as tools write it,
galleries that can be described and deleted, leftovers swept, one-line start-up errors, the CLI."""
from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fewshot.errors import InvalidLabel, UnknownGallery
from fewshot.gallery_store import GalleryStore
from fewshot.validate import LABEL_PATTERN, check_label
from fewshot_service.config import Settings
from fewshot_service.main import create_app

from .test_service import COLOURS, FakeEncoder, enroll, png

DIM = 3


def unit(rng, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------- labels
@pytest.mark.parametrize("label, stored", [
    ("cafe\u0301", "caf\u00e9"),  # NFD and NFC: one class
    ("cat\u200b", "cat"),  # a zero-width space at an end is stripped
    ("\u200bcat ", "cat"),
    ("AC/DC", "AC/DC"),
    ("\U0001F469\u200d\U0001F52C", "\U0001F469\u200d\U0001F52C"),  # an emoji sequence keeps its joiner
])
def test_labels_are_stored_in_one_form(label, stored):
    assert check_label(label) == stored


@pytest.mark.parametrize("label, says", [
    ("\u200b", "invisible"), (" \u200b\ufeff ", "invisible"), ("", "empty"),
    ("abc\u202egpj.exe", "U+202E (RIGHT-TO-LEFT OVERRIDE)"), ("a\u2066b", "U+2066"), ("a\x07b", "U+0007"),
])
def test_labels_that_show_nothing_or_display_reversed_are_refused_naming_the_character(label, says):
    with pytest.raises(InvalidLabel, match=says.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        check_label(label)


def test_the_documented_label_pattern_agrees_with_the_check():
    import re

    pattern = re.compile(LABEL_PATTERN)
    for label in ["cat", "AC/DC", "caf\u00e9", "\U0001F469\u200d\U0001F52C"]:
        assert pattern.match(label)
    for label in ["\u200b", "abc\u202egpj", "a\x07b", " "]:
        assert not pattern.match(label)


def test_nfc_and_nfd_enroll_one_class(tmp_path):
    g = GalleryStore(tmp_path).get("g", DIM, "fp", create=True)
    rng = np.random.default_rng(0)
    g.add("cafe\u0301", unit(rng, 1))
    g.add("caf\u00e9", unit(rng, 1))
    assert g.rows.classes() == [("caf\u00e9", 2)]


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path), encoder=FakeEncoder())) as c:
        yield c


def test_a_label_with_a_slash_is_reachable_on_every_route(client):
    assert enroll(client, "red", png(COLOURS["red"])).status_code == 201
    assert client.patch("/v1/galleries/shop/classes/red", json={"label": "AC/DC"}).json()["label"] == "AC/DC"
    r = client.get("/v1/galleries/shop/classes/AC%2FDC")  # the "/" percent-encoded, as in any path segment
    assert r.status_code == 200 and r.json()["label"] == "AC/DC" and r.json()["count"] == 1, r.text
    assert client.get("/v1/galleries/shop/classes/AC/DC").status_code == 404  # a literal "/" separates segments
    assert client.patch("/v1/galleries/shop/classes/x/examples", json={"label": "y"}).status_code == 405
    files = [("files", ("x.png", png(COLOURS["red"], shade=30), "image/png"))]
    assert client.post("/v1/galleries/shop/classes/AC%2FDC/examples", files=files).json()["count"] == 2
    assert [c["label"] for c in client.get("/v1/galleries/shop/classes").json()["classes"]] == ["AC/DC"]
    r = client.post("/v1/galleries/shop/recognize", files=files)
    assert r.json()["results"][0]["matches"][0]["label"] == "AC/DC"
    assert client.patch("/v1/galleries/shop/classes/AC%2FDC", json={"label": "a/b/c"}).status_code == 200
    assert client.delete("/v1/galleries/shop/classes/a%2Fb%2Fc").json() == {"removed": 2}
    assert client.get("/v1/galleries/shop/classes").json()["total"] == 0


def test_nested_folders_imported_as_labels_are_reachable(tmp_path, client):
    """`fewshot embed` labels a nested tree by its folder path (Greek/character01); imported into a
    gallery, such a class answers on its route like any other."""
    from fewshot.embedded import open_output  # noqa: F401 - the layout the import reads
    from fewshot.transfer import import_embedded

    out = tmp_path / "emb"
    _write_embedded(out, ["Greek/character01", "Greek/character02"])
    store = client.app.state.store
    import_embedded(store, out, "glyphs", progress=False)
    r = client.get("/v1/galleries/glyphs/classes/Greek%2Fcharacter01")
    assert r.status_code == 200 and r.json()["count"] == 1


def _write_embedded(out: Path, labels: list[str]) -> None:
    """A tiny OUT folder as `fewshot embed` writes it (npy layout), with FakeEncoder's vectors."""
    import json

    out.mkdir()
    x = np.eye(3, dtype=np.float32)[: len(labels)]
    np.save(out / "embeddings.npy", x)
    (out / "manifest.jsonl").write_text("".join(json.dumps({"row": i, "path": f"{label}/{i}.png", "label": label})
                                                + "\n" for i, label in enumerate(labels)))
    (out / "errors.jsonl").write_text("")
    fake = FakeEncoder()
    (out / "meta.json").write_text(json.dumps({"encoder": fake.name, "fingerprint": fake.fingerprint, "dim": 3,
                                               "count": len(labels), "errors": 0, "shards": 1, "format": "npy",
                                               "complete": True}))


# ---------------------------------------------------------------- base64
def test_base64_wrapped_at_76_columns_is_accepted(client):
    data = png(COLOURS["blue"])
    wrapped = base64.encodebytes(data).decode()  # what the `base64` command writes: lines of 76
    assert "\n" in wrapped
    r = client.post("/v1/galleries/shop/classes/blue/examples", json={"images": [wrapped]})
    assert r.status_code == 201, r.text
    spaced = " ".join(base64.b64encode(data).decode()[i:i + 10] for i in range(0, 40, 10)) + \
        base64.b64encode(data).decode()[40:]
    assert client.post("/v1/galleries/shop/recognize", json={"images": ["data:image/png;base64," + spaced]}).json()[
        "results"][0]["matches"][0]["label"] == "blue"
    assert client.post("/v1/galleries/shop/recognize", json={"images": ["not base64!"]}).status_code == 400


# ---------------------------------------------------------------- galleries: describe, delete
def test_get_a_gallery_and_page_through_a_class(client):
    for i in range(5):
        assert enroll(client, "red", png(COLOURS["red"], shade=5 * i)).status_code == 201
    enroll(client, "blue", png(COLOURS["blue"]))
    g = client.get("/v1/galleries/shop").json()
    assert (g["encoder"], g["dim"], g["classes"], g["examples"]) == ("fake", 3, 2, 6)
    assert g["threshold_source"] in ("gallery", None) and g["created"] > 0 and g["version"] == 6
    everything = client.get("/v1/galleries/shop/classes/red").json()
    page = client.get("/v1/galleries/shop/classes/red?offset=1&limit=2").json()
    assert page["ids"] == everything["ids"][1:3] and (page["total"], page["offset"], page["limit"]) == (5, 1, 2)
    assert client.get("/v1/galleries/nope").status_code == 404


def test_delete_a_gallery_through_the_api(client, tmp_path):
    enroll(client, "red", png(COLOURS["red"]))
    assert client.delete("/v1/galleries/shop").json() == {"deleted": "shop"}
    assert client.get("/v1/galleries/shop").status_code == 404
    assert client.get("/v1/galleries").json() == []
    assert not (tmp_path / "shop").exists() and not list(tmp_path.glob(".shop*"))
    assert client.delete("/v1/galleries/shop").status_code == 404
    assert enroll(client, "blue", png(COLOURS["blue"])).json()["count"] == 1  # a new one, empty but for this
    assert [c["label"] for c in client.get("/v1/galleries/shop/classes").json()["classes"]] == ["blue"]


def test_delete_on_both_stores_and_another_process_drops_its_copy(location):
    rng = np.random.default_rng(1)
    here, there = GalleryStore(location), GalleryStore(location)
    try:
        here.get("g", DIM, "fp", create=True).add("x", unit(rng, 2))
        assert len(there.get("g")) == 2
        here.delete("g")
        assert "g" not in here.names()
        with pytest.raises(UnknownGallery):
            here.get("g")
        with pytest.raises(UnknownGallery):
            here.delete("g")
        if here.kind == "postgresql":  # the other replica hears of it and closes its copy
            deadline = time.monotonic() + 10
            while "g" in there.opened():
                assert time.monotonic() < deadline, "the other replica kept the deleted gallery"
                time.sleep(0.05)
        assert len(here.get("g", DIM, "fp", create=True)) == 0  # made anew, empty
    finally:
        here.close()
        there.close()


def test_a_deletion_interrupted_half_way_leaves_nothing_after_the_next_start(tmp_path):
    GalleryStore(tmp_path).get("g", DIM, "fp", create=True).add("x", unit(np.random.default_rng(2), 1))
    (tmp_path / "g").rename(tmp_path / ".g.deleted.abcd1234")  # a crash right after the rename step
    store = GalleryStore(tmp_path)
    assert store.names() == [] and not list(tmp_path.glob(".*"))


def test_a_stopped_reembedding_leaves_no_scratch_after_the_next_start(tmp_path):
    from fewshot.stores.sqlite import SqliteHome

    left = tmp_path / ".g.reembed"
    left.mkdir(parents=True)
    (left / "gallery.sqlite").write_bytes(b"x" * 1000)
    busy = SqliteHome(tmp_path).scratch("h")  # another process building one right now keeps it
    SqliteHome(tmp_path)
    assert not left.exists() and busy.folder.exists()


def test_a_stopped_reembedding_on_postgresql_leaves_no_scratch_after_the_next_start(database_url):
    import psycopg

    from fewshot.stores.postgres import PostgresHome

    crashed = PostgresHome(database_url)
    db = crashed.scratch("g")
    db.create({"dim": "3", "fingerprint": "fp", "version": "0"})
    db.hold.close()  # the process building it died: its session lock went with its connection
    crashed.pool.close()
    busy = PostgresHome(database_url).scratch("h")
    busy.create({"dim": "3", "fingerprint": "fp", "version": "0"})
    PostgresHome(database_url).close()  # a start sweeps
    with psycopg.connect(database_url) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM fewshot.galleries")]
    assert names == [".h.reembed"]


# ---------------------------------------------------------------- start-up mistakes
def _serve(*args: str, env: dict | None = None, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    import os

    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "fewshot.cli", "serve", *args], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, **(env or {})})
    return run, time.monotonic() - started


def _one_line(run: subprocess.CompletedProcess, says: str) -> None:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("fewshot serve: error: "), run.stderr
    assert says in lines[0], lines[0]


def test_an_unknown_encoder_is_one_line_before_any_model_loads(tmp_path):
    run, _ = _serve("--data-dir", str(tmp_path), env={"FEWSHOT_ENCODER": "nonsense"})
    _one_line(run, "FEWSHOT_ENCODER='nonsense': unknown encoder")
    run, _ = _serve("--data-dir", str(tmp_path), env={"FEWSHOT_ENCODERS": "efficientnet_lite0,nope"})
    _one_line(run, "FEWSHOT_ENCODERS lists 'nope'")


def test_a_data_dir_that_cannot_be_written_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    run, _ = _serve("--data-dir", str(blocker / "data"))
    _one_line(run, "cannot be written")
    if __import__("os").geteuid() != 0:  # root writes anywhere: a read-only directory stops only others
        readonly = tmp_path / "ro"
        readonly.mkdir(mode=0o555)
        _one_line(_serve("--data-dir", str(readonly))[0], "cannot be written")


def test_a_port_in_use_or_out_of_range_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run, seconds = _serve("--data-dir", str(tmp_path), "--port", str(port))
    _one_line(run, f"cannot listen on 127.0.0.1:{port}")
    _one_line(_serve("--data-dir", str(tmp_path), "--port", "99999")[0], "--port 99999 is out of range")


def test_an_unreachable_database_is_one_line_within_seconds(tmp_path):
    run, seconds = _serve("--database-url", f"postgresql://fewshot:secret@/none?host={tmp_path}&port=1")
    _one_line(run, "cannot reach the gallery database")
    assert "secret" not in run.stderr and seconds < 15, seconds  # 5 s of waiting, and Python's start


# ---------------------------------------------------------------- the command line
def test_version_and_every_option_says_its_default():
    import argparse

    from fewshot.cli import build_parser

    run = subprocess.run([sys.executable, "-m", "fewshot.cli", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("fewshot ")
    missing = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif action.option_strings and action.dest not in ("help", "version"):
                if not action.help:
                    missing.append((path, action.option_strings, "no help"))
                elif action.default not in (None, False) and "default" not in text.split(action.option_strings[0])[-1][:400]:
                    missing.append((path, action.option_strings, "no default"))

    walk(build_parser(), [])
    assert not missing, missing


def test_embed_exits_1_when_nothing_could_be_embedded_and_warns_of_unlabelled_images(tmp_path, cache_dir):
    bad = tmp_path / "bad" / "cats"
    bad.mkdir(parents=True)
    (bad / "a.jpg").write_bytes(b"not a jpeg")
    run = subprocess.run([sys.executable, "-m", "fewshot.cli", "embed", str(tmp_path / "bad"), str(tmp_path / "o1"),
                          "--cache-dir", str(cache_dir), "--workers", "0", "--quiet"], capture_output=True, text=True)
    assert run.returncode == 1 and "nothing could be embedded" in run.stderr, run.stderr
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "x.png").write_bytes(png(COLOURS["red"], size=(64, 64)))
    run = subprocess.run([sys.executable, "-m", "fewshot.cli", "embed", str(loose), str(tmp_path / "o2"),
                          "--cache-dir", str(cache_dir), "--workers", "0", "--quiet"], capture_output=True, text=True)
    assert run.returncode == 0 and "1 image(s) lie outside any class folder" in run.stderr, run.stderr


def test_eval_says_what_the_data_has_and_what_to_pass(tmp_path):
    out = tmp_path / "emb"
    _write_embedded(out, ["a", "a", "b"])
    run = subprocess.run([sys.executable, "-m", "fewshot.cli", "eval", str(out)], capture_output=True, text=True)
    assert run.returncode == 2
    assert "The data has 2 labelled classes with 1 to 2 examples each" in run.stderr or \
        "most with 1 example" in run.stderr, run.stderr


def test_fewshot_gallery_delete(tmp_path):
    GalleryStore(tmp_path).get("gone", DIM, "fp", create=True).add("x", unit(np.random.default_rng(3), 1))
    run = subprocess.run([sys.executable, "-m", "fewshot.cli", "gallery", "delete", "gone", "--data-dir",
                          str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0 and "deleted gallery gone" in run.stdout, run.stderr
    assert GalleryStore(tmp_path).names() == []
    run = subprocess.run([sys.executable, "-m", "fewshot.cli", "gallery", "delete", "gone", "--data-dir",
                          str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "no gallery 'gone'" in run.stderr


def test_the_api_document_names_its_keys_and_each_routes_own_statuses(client):
    from collections import Counter

    schema = client.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"apiKey", "bearer"}
    operations = [(path, method, op) for path, ops in schema["paths"].items() for method, op in ops.items()]
    summaries = Counter(op["summary"] for _, _, op in operations)
    assert [s for s, n in summaries.items() if n > 1] == []
    statuses = {(path, method): set(op["responses"]) for path, method, op in operations}
    assert statuses[("/v1/galleries", "get")] == {"200", "401", "403", "503"}
    assert "413" in statuses[("/v1/galleries/{gallery}/recognize", "post")]
    assert "413" not in statuses[("/v1/galleries/{gallery}/classes", "get")]
    assert "security" not in schema["paths"]["/healthz"]["get"]
