"""The search page in a real browser: headless Chromium (Debian's, driven by Playwright) against a real uvicorn
server on 127.0.0.1 over the small `built` index. Screenshots of each state go to test-artifacts/."""

from __future__ import annotations

import base64
import mimetypes
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import N_IMAGES

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
KEY = "page-key"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-default-apps", "--disable-extensions"]


@pytest.fixture(scope="module")
def page_server(built):
    from test_service import _free_port

    port = _free_port()
    env = dict(os.environ, ALIGNSEARCH_API_KEY=KEY)
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--index", str(built), "--port", str(port),
                             "--device", "cpu", "--log-level", "warning"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail("server did not become ready in 120 s")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium); the browser test needs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; its own browser download is not needed)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_page_and_its_assets_need_no_key(page_server):
    """The page is open (the API key is typed into it); its assets are all served by the server itself."""
    html = httpx.get(page_server + "/")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="(/[^"]*)"', html.text)
    assert {"/static/app.js", "/static/style.css"} <= set(assets)
    for asset in assets:
        if asset.startswith("/static/"):
            assert httpx.get(page_server + asset).status_code == 200, asset
    assert not re.search(r'(?:src|href)="(?:https?:)?//', html.text)  # nothing from outside the server
    assert httpx.post(page_server + "/search/text", json={"query": "dog"}).status_code == 401
    assert "/" not in httpx.get(page_server + "/openapi.json").json()["paths"]


def _all_images_loaded(page, selector: str) -> None:
    page.wait_for_function(
        "sel => { const imgs = Array.from(document.querySelectorAll(sel));"
        " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }", arg=selector)


def _drop_file(page, selector: str, path: Path) -> None:
    """A real drop event carrying the file, as a drag from the desktop would make it."""
    data = page.evaluate_handle(
        """([b64, name, type]) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
             const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type})); return dt; }""",
        [base64.b64encode(path.read_bytes()).decode(), path.name, mimetypes.guess_type(path.name)[0]])
    page.dispatch_event(selector, "dragenter", {"dataTransfer": data})
    assert "over" in page.get_attribute(selector, "class")
    page.dispatch_event(selector, "drop", {"dataTransfer": data})


@pytest.mark.slow
def test_search_page_text_overlay_upload_and_drop(browser, page_server, built):  # browser first: skip early
    from indexer.index import Index

    index = Index(built)
    query, target = index.conn.execute(
        "SELECT text, image_id FROM captions WHERE image_id IS NOT NULL ORDER BY row LIMIT 1 OFFSET 7").fetchone()
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    outside, errors = [], []
    page.on("request", lambda r: outside.append(r.url)
            if not r.url.startswith((page_server, "blob:", "data:")) else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_server + "/")
    assert page.title() == "alignsearch"
    page.wait_for_function("document.getElementById('index-info').textContent.includes('images')")
    assert page.inner_text("#index-info") == f"{N_IMAGES} images · {index.manifest['counts']['captions']} captions"

    # without the key the API refuses, and the page says so (and opens its settings, where the key goes)
    page.fill("#query", query)
    page.click("#search-button")
    page.wait_for_selector("#text-status.error")
    assert "401" in page.inner_text("#text-status") and page.locator("#settings[open]").count() == 1
    page.fill("#api-key", KEY)

    # 1. text -> ranked thumbnails with scores (fetched with the key, since an <img> cannot send it)
    page.click("#search-button")
    page.wait_for_selector("#image-results figure.card img")
    cards = page.locator("#image-results figure.card")
    assert cards.count() == min(12, N_IMAGES)
    _all_images_loaded(page, "#image-results img")
    scores = [float(t.split("score ")[1]) for t in page.locator("#image-results .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    ids = cards.evaluate_all("cards => cards.map(c => c.dataset.id)")
    assert target in ids[:3]  # a caption finds its own image near the top
    assert len(set(ids)) == len(ids) and set(ids) <= {r[0] for r in index.conn.execute("SELECT id FROM images")}
    assert page.locator(".cell").count() == 0
    assert "images in" in page.inner_text("#text-status")
    page.screenshot(path=str(ARTIFACTS / "1-text-results.png"), full_page=True)

    # 2. the overlay: every content word of the query (no stopwords) is drawn on the grid cell it matched,
    # and named on hover
    page.fill("#query", "a dog runs through the grass")
    page.check("#explain")
    page.wait_for_selector("#image-results .cell")
    _all_images_loaded(page, "#image-results img")
    first = cards.first
    words = " ".join(first.locator(".cell").evaluate_all("cells => cells.map(c => c.dataset.word)")).split()
    assert sorted(words) == ["dog", "grass", "runs"]
    assert first.locator(".legend .chip").all_inner_texts() == ["dog", "runs", "grass"]
    for cell in first.locator(".cell").all():  # inside the picture, one 7 x 7 grid cell each
        box, img = cell.bounding_box(), first.locator("img").bounding_box()
        assert box["width"] == pytest.approx(img["width"] / 7, abs=1.5)
        assert img["x"] - 1 <= box["x"] and box["x"] + box["width"] <= img["x"] + img["width"] + 1
    dog = first.locator(".cell[data-word~='dog']")
    assert not dog.locator(".word").is_visible()
    dog.hover()
    assert dog.locator(".word").is_visible() and "dog" in dog.locator(".word").inner_text()
    page.screenshot(path=str(ARTIFACTS / "2-grounding-overlay.png"), full_page=True)
    first.locator(".chip", has_text="grass").hover()  # the word under the picture lights its cell up
    assert first.locator(".cell.lit[data-word~='grass']").count() == 1

    # 3. image upload -> captions, the image's own captions first
    page.set_input_files("#file", str(index.images_root / target))
    page.wait_for_selector("#caption-results li")
    _all_images_loaded(page, "#upload-preview img, #caption-results img")
    ids = page.locator("#caption-results li").evaluate_all("items => items.map(i => i.dataset.id)")
    assert len(ids) == 12 and sum(i.startswith(target + "#") for i in ids[:5]) >= 2
    assert all(t.strip() for t in page.locator("#caption-results .caption").all_inner_texts())
    assert "captions in" in page.inner_text("#image-status")
    page.screenshot(path=str(ARTIFACTS / "3-image-to-captions.png"), full_page=True)

    # 4. drag and drop another photo onto the drop zone
    other = index.conn.execute("SELECT image_id FROM captions WHERE image_id IS NOT NULL AND image_id != ? "
                               "ORDER BY row LIMIT 1", (target,)).fetchone()[0]
    _drop_file(page, "#drop-zone", index.images_root / other)
    page.wait_for_function("id => document.querySelector('#caption-results li')?.dataset.id.startsWith(id + '#')",
                           arg=other)
    assert "over" not in page.get_attribute("#drop-zone", "class")
    page.screenshot(path=str(ARTIFACTS / "4-dropped-image.png"), full_page=True)

    assert outside == []  # no asset from outside the server
    assert errors == []
    page.close()
