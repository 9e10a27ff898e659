"""fewshot_client.Client against a live service: every call, and the service's errors as exceptions."""
from __future__ import annotations

import pytest

from fewshot_client import BadRequest, Client, Conflict, NotFound, Unauthorized, Unavailable
from fewshot_service.config import Settings
from fewshot_service.main import create_app

from .conftest import serve_in_thread
from .test_service import COLOURS, FakeEncoder, png


@pytest.fixture
def live(tmp_path):
    stop, url = serve_in_thread(create_app(Settings(data_dir=tmp_path, admin_key="admin", read_key="reader",
                                                    max_adapt_jobs=0), encoder=FakeEncoder()))
    yield url
    stop()


def test_every_call(live, tmp_path):
    (tmp_path / "blue.png").write_bytes(png(COLOURS["blue"]))
    with Client(live, api_key="admin") as c:
        assert c.ready()["status"] == "ready"
        assert c.create_gallery("shop", "fake") == {"name": "shop", "encoder": "fake", "examples": 0}
        red = c.enroll("shop", "red", png(COLOURS["red"]), png(COLOURS["red"], shade=30))
        assert red["count"] == 2 and len(red["ids"]) == 2
        c.enroll("shop", "blue", tmp_path / "blue.png")  # a path works too
        assert [x["label"] for x in c.classes("shop")["classes"]] == ["blue", "red"]
        answer = c.recognize("shop", png((200, 20, 20)), k=1)
        assert answer["results"][0]["matches"][0]["label"] == "red"
        assert c.verify("shop", png(COLOURS["blue"]), "blue")["match"] is True
        assert len(c.embed(png(COLOURS["red"]))["embeddings"][0]) == 3
        assert c.rename_class("shop", "blue", "navy")["label"] == "navy"
        assert c.delete_example("shop", red["ids"][0]) == {"removed": 1}
        assert c.delete_class("shop", "navy") == {"removed": 1}
        assert c.get_class("shop", "red")["count"] == 1
        assert c.galleries() == [{"name": "shop", "encoder": "fake", "examples": 1}]


def test_errors_are_exceptions(live):
    with Client(live, api_key="admin") as c:
        c.enroll("shop", "red", png(COLOURS["red"]))
        with pytest.raises(BadRequest) as bad:
            c.enroll("shop", "red", b"not an image")
        assert bad.value.status == 400 and bad.value.kind == "invalid_image" and "not an image" in bad.value.message
        with pytest.raises(NotFound):
            c.get_class("shop", "kiwi")
        with pytest.raises(Conflict):
            c.create_gallery("shop", "face")
        with pytest.raises(Unavailable) as busy:
            c._call("POST", "/v1/galleries/shop/adapt")
        assert busy.value.status == 429 and busy.value.retry_after == 30
    with Client(live, api_key="reader") as reader:
        assert reader.classes("shop")["total"] == 1
        with pytest.raises(Unauthorized) as denied:
            reader.enroll("shop", "blue", png(COLOURS["blue"]))
        assert denied.value.status == 403
    with Client(live) as anonymous, pytest.raises(Unauthorized):
        anonymous.galleries()


def test_the_readmes_client_snippet_runs_on_the_samples(tmp_path, monkeypatch, capsys):
    """The README's Python block, as written, against a live server (FakeEncoder: any answer will do)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    stop, url = serve_in_thread(create_app(Settings(data_dir=tmp_path), encoder=FakeEncoder()))
    try:
        monkeypatch.chdir(root)
        exec(compile(snippet.replace("http://127.0.0.1:8000", url), "README.md", "exec"), {})
    finally:
        stop()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("[{'label':") and printed[1].startswith("3 [")
