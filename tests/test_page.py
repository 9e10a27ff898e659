"""The page in a real browser (Debian's chromium driven by Playwright): create a gallery, enroll two
classes from files, recognise a third image, rename and delete a class; keys; a 375 px wide screen."""
from __future__ import annotations

import shutil

import pytest

from fewshot_service.config import Settings
from fewshot_service.main import create_app

from .conftest import serve_in_thread
from .test_service import COLOURS, FakeEncoder, png

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra has it)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine: apt-get install chromium")


def serve(settings: Settings):
    return serve_in_thread(create_app(settings, encoder=FakeEncoder()))


@pytest.fixture
def browser():
    with playwright.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def images(tmp_path):
    paths = {}
    for name, colour, shade in [("red", COLOURS["red"], 0), ("blue", COLOURS["blue"], 0), ("query", COLOURS["red"], 30)]:
        paths[name] = tmp_path / f"{name}.png"
        paths[name].write_bytes(png(colour, size=(64, 48), shade=shade))
    return paths


def test_enroll_recognise_rename_delete_in_the_browser(browser, images, tmp_path):
    stop, url = serve(Settings(data_dir=tmp_path / "data"))
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "/")
        page.fill("#new-name", "shop")
        page.click("#create-form button[type=submit]")
        page.wait_for_selector("#gallery-title:has-text('shop')")
        for label in ("red", "blue"):
            page.fill("#enroll-label", label)
            page.set_input_files("#enroll-files", str(images[label]))
            page.click("#enroll-form button[type=submit]")
            page.wait_for_selector(f"#classes li[data-label='{label}'] strong:has-text('{label} (1)')")
        page.wait_for_function("() => [...document.querySelectorAll('.thumb img')].every(i => i.complete && i.naturalWidth)")
        page.set_input_files("#recognize-file", str(images["query"]))
        prediction = page.wait_for_selector("[data-testid=prediction]")
        assert prediction.inner_text() == "red"
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        page.fill("input[aria-label='New name for red']", "crimson")
        page.click("#classes li[data-label='red'] button:has-text('Rename')")
        page.wait_for_selector("#classes li[data-label='crimson']")
        page.on("dialog", lambda dialog: dialog.accept())
        page.click("button[aria-label='Delete class blue']")
        page.wait_for_selector("#classes li[data-label='blue']", state="detached")
        assert "Deleted blue (1 example)" in page.inner_text("#message")
        page.set_viewport_size({"width": 375, "height": 800})  # a phone: nothing wider than the screen
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        page.screenshot(path=str(tmp_path / "page-375.png"), full_page=True)
    finally:
        stop()


def test_keys_are_asked_for_in_words(browser, tmp_path):
    stop, url = serve(Settings(data_dir=tmp_path / "data", admin_key="admin", read_key="reader"))
    try:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#message.error")
        assert "enter an API key" in page.inner_text("#message")
        page.fill("#api-key", "reader")
        page.click("#key-form button")
        page.wait_for_selector("#galleries tbody tr")
        page.fill("#new-name", "locked")
        page.click("#create-form button[type=submit]")
        page.wait_for_selector("#message.error")
        assert "may only read" in page.inner_text("#message")
    finally:
        stop()


def test_api_docs_render_offline_in_the_browser(browser, tmp_path):
    """/docs and /redoc load their scripts from the server itself: requests elsewhere are refused."""
    stop, url = serve(Settings(data_dir=tmp_path / "data"))
    try:
        page = browser.new_page()
        elsewhere = []
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url)
                   else (elsewhere.append(route.request.url), route.abort()))
        page.goto(url + "/docs")
        page.wait_for_selector(".opblock-summary-path[data-path='/v1/galleries/{gallery}/recognize']")
        page.click(".opblock-summary-path[data-path='/v1/galleries/{gallery}/recognize']")
        page.wait_for_selector("option[value='multipart/form-data']", state="attached")  # the upload body
        page.goto(url + "/redoc")
        page.wait_for_selector("h2:has-text('Recognize Embedding')", timeout=20_000)
        # ReDoc's bundled script points its small "powered by" logo at its CDN; offline it just does not
        # show. Nothing else is fetched from outside.
        assert [u for u in elsewhere if not u.endswith("/redoc/logo-mini.svg")] == []
    finally:
        stop()


def test_the_page_names_files_shows_the_threshold_and_keeps_the_key_for_the_tab(browser, images, tmp_path):
    """Non-image files are named, server errors name the file, no broken image stays after a failed
    recognise, bars say accepted vs below with the threshold drawn, the key stays in the tab unless
    remembered, a gallery deletes after confirmation, and the page is sent with CSP and X-Frame-Options."""
    import httpx

    stop, url = serve(Settings(data_dir=tmp_path / "data"))
    try:
        headers = httpx.get(url + "/").headers
        assert headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "script-src 'self'" in httpx.get(url + "/static/app.js").headers["content-security-policy"]
        console = []
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        page.goto(url + "/")
        page.fill("#new-name", "shop")
        page.click("#create-form button[type=submit]")
        page.wait_for_selector("#gallery-title:has-text('shop')")
        notes, broken = tmp_path / "notes.txt", tmp_path / "broken.jpg"
        notes.write_text("not a photo")
        broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
        page.set_input_files("#enroll-files", [str(images["red"]), str(notes)])
        assert "notes.txt" in page.inner_text("#message") and "1 image(s): red.png" in page.inner_text("#enroll-chosen")
        page.fill("#enroll-label", "red")
        page.set_input_files("#enroll-files", str(broken))  # the browser takes it for an image; the server not
        page.click("#enroll-form button[type=submit]")
        page.wait_for_function("() => document.getElementById('message').textContent.includes('broken.jpg')")
        assert page.inner_text("#message").startswith("broken.jpg: "), page.inner_text("#message")
        for label in ("red", "blue"):
            page.fill("#enroll-label", label)
            page.set_input_files("#enroll-files", str(images[label]))
            page.click("#enroll-form button[type=submit]")
            page.wait_for_selector(f"#classes li[data-label='{label}']")
        page.set_input_files("#recognize-file", str(images["query"]))
        page.wait_for_selector("[data-testid=prediction]")
        assert page.locator(".fill.accepted").count() >= 1 or page.locator(".threshold").count() == 0
        if page.locator(".threshold").count():  # a calibrated or reference threshold: drawn on every bar
            assert page.locator(".fill.below").count() >= 1  # blue scores under it
        page.set_input_files("#recognize-file", str(broken))
        page.wait_for_function("() => document.getElementById('message').textContent.includes('broken.jpg')")
        assert page.locator("#recognize-stage").is_hidden() and page.get_attribute("#recognize-image", "src") is None
        assert page.locator("#results li").count() == 0
        page.fill("#api-key", "some-key")
        page.click("#key-form button")
        assert page.evaluate("localStorage.getItem('fewshot-key')") is None
        assert page.evaluate("sessionStorage.getItem('fewshot-key')") == "some-key"
        page.check("#remember-key")
        page.click("#key-form button")
        assert page.evaluate("localStorage.getItem('fewshot-key')") == "some-key"
        page.fill("#api-key", "")
        page.click("#key-form button")
        page.on("dialog", lambda dialog: dialog.accept())
        page.click("#delete-gallery")
        page.wait_for_selector("#galleries-view:not([hidden])")
        assert "Gallery shop deleted" in page.inner_text("#message")
        assert httpx.get(url + "/v1/galleries").json() == []
        assert not [c for c in console if "Content Security Policy" in c], console
    finally:
        stop()


def test_the_page_names_the_margin_when_a_big_gallery_decides_on_it(browser, images, tmp_path):
    """A gallery of 120 examples in 3 classes calibrates itself on the margin over the runner-up: the page
    says so with the value, and draws no score threshold on the bars (it is not on their scale)."""
    import numpy as np

    from fewshot.gallery_store import GalleryStore

    rng = np.random.default_rng(0)
    gallery = GalleryStore(tmp_path / "data").get("big", 3, "fake-fp", "fake", create=True)
    for k, label in enumerate(("red", "green", "blue")):
        rows = np.eye(3)[k] + 0.35 * rng.standard_normal((40, 3))
        gallery.add(label, (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32))
    gallery.close()
    stop, url = serve(Settings(data_dir=tmp_path / "data"))
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "/#g/big")
        page.wait_for_selector("#gallery-title:has-text('big')")
        page.set_input_files("#recognize-file", str(images["query"]))
        page.wait_for_selector("[data-testid=prediction]")
        verdict = page.inner_text("#results li p")
        assert "margin over the runner-up" in verdict and "(gallery)" in verdict, verdict
        assert page.locator(".threshold").count() == 0 and page.locator(".fill.accepted").count() <= 1
    finally:
        stop()
