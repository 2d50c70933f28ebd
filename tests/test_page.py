"""The search page in a real browser: headless Chromium (Debian's, driven by Playwright) against a real uvicorn
server on 127.0.0.1 over the small `built` index. Screenshots of each state go to test-artifacts/, and each state
is checked for the layout faults a script can see: text wider than its box, elements outside the viewport, a
placeholder cut short, cards stretched to their neighbours' height, captions out of line, overlay labels cut
at the photo's edge. Response fields the API may add (a confidence per word, weak-match flags) are exercised by
rewriting real responses in the browser."""

from __future__ import annotations

import base64
import json
import mimetypes
import re
from pathlib import Path

import httpx
import pytest

from alignsearch.service.launch import serve

from conftest import N_IMAGES

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
KEY = "page-key"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-default-apps", "--disable-extensions"]


@pytest.fixture(scope="module")
def page_server(built):
    with serve(built, env={"ALIGNSEARCH_API_KEY": KEY}) as url:
        yield url


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


@pytest.mark.slow
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


@pytest.mark.parametrize("path, assets", [
    ("/docs", {"/static/docs/swagger-ui-bundle.js": "javascript", "/static/docs/swagger-ui.css": "text/css",
               "/static/docs/favicon.png": "image/png"}),
    ("/redoc", {"/static/docs/redoc.standalone.js": "javascript", "/static/docs/favicon.png": "image/png"}),
])
def test_api_docs_load_nothing_from_other_hosts(page_server, path, assets):
    """The docs pages link only to this server's own copies of Swagger UI and ReDoc (no CDN, no web fonts),
    open without the API key like the schema they render."""
    html = httpx.get(page_server + path)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    linked = set(re.findall(r'(?:src|href)="([^"]*)"', html.text))
    assert linked == set(assets), linked
    assert not re.search(r"(?:https?:)?//[\w.-]+", html.text.replace("http://www.w3.org", ""))  # no host named
    for asset, kind in assets.items():
        response = httpx.get(page_server + asset)
        assert response.status_code == 200 and kind in response.headers["content-type"], asset
        assert len(response.content) > 1000, asset
    assert httpx.get(page_server + "/openapi.json").status_code == 200
    # and the browser may fetch nothing from elsewhere (ReDoc's footer names a logo on its makers' CDN)
    assert "default-src 'self'" in html.headers["content-security-policy"]
    assert "http" not in html.headers["content-security-policy"]
    if path == "/docs":  # Swagger UI's validator badge would send the schema's address to another host
        assert '"validatorUrl": null' in html.text


def _only_this_server(page, server: str) -> list[str]:
    """Route every request the page makes: to ``server`` it goes through, any other is aborted and listed."""
    elsewhere: list[str] = []

    def handle(route):
        if route.request.url.startswith(server + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", handle)
    return elsewhere


def test_api_docs_render_with_no_other_host_in_reach(browser, page_server):
    """Swagger UI at /docs and ReDoc at /redoc draw the API's operations with every other host unreachable,
    as on a machine without internet access, and try to reach none."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    elsewhere = _only_this_server(page, page_server)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(page_server + "/docs")
    page.locator('.opblock-summary-path[data-path="/search/text"]').wait_for(state="visible", timeout=30_000)
    assert page.locator(".opblock-summary-path").count() >= 5  # every route of the API, not one
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "docs-swagger.png"))
    page.goto(page_server + "/redoc")
    page.get_by_text("ranked images for a sentence").first.wait_for(state="visible", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "docs-redoc.png"))
    page.close()
    assert elsewhere == [] and errors == []

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


# Layout faults a script can detect, for whatever is on screen now (closed or hidden parts are skipped).
LAYOUT_FAULTS = """() => {
  const faults = [];
  const vw = document.documentElement.clientWidth;
  if (document.documentElement.scrollWidth > vw + 1)
    faults.push(`the page scrolls sideways: ${document.documentElement.scrollWidth} > ${vw}`);
  const name = (e) => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') +
    (typeof e.className === 'string' && e.className ? '.' + e.className.trim().split(/\\s+/).join('.') : '');
  const canvas = document.createElement('canvas').getContext('2d');
  for (const e of document.querySelectorAll('body *')) {
    const cs = getComputedStyle(e);
    const r = e.getBoundingClientRect();
    if (cs.display === 'none' || cs.visibility === 'hidden' || (r.width === 0 && r.height === 0)) continue;
    if (r.left < -1 || r.right > vw + 1) faults.push(`${name(e)} is outside the viewport (${r.left}..${r.right} of ${vw})`);
    // (an input scrolls its own text, an image has none; an overlay cell's hover label sticks out by design and
    // is checked below)
    if (cs.display !== 'inline' && !['INPUT', 'IMG'].includes(e.tagName) && !e.matches('.cell') && e.clientWidth > 0 &&
        e.scrollWidth > e.clientWidth + 1)
      faults.push(`${name(e)}: its content overflows (${e.scrollWidth} > ${e.clientWidth}): ${e.textContent.slice(0, 60)}`);
    if (e.tagName === 'INPUT' && e.placeholder) {
      canvas.font = cs.font;
      const room = e.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
      if (canvas.measureText(e.placeholder).width > room + 1) faults.push(`${name(e)}: placeholder cut ("${e.placeholder}")`);
    }
  }
  for (const card of document.querySelectorAll('#image-results .card')) {  // cards keep their own height
    const parts = Array.from(card.children).reduce((h, c) => h + c.getBoundingClientRect().height, 0);
    if (card.getBoundingClientRect().height > parts + 4) faults.push(`card ${card.dataset.id} stretched`);
  }
  const lefts = Array.from(document.querySelectorAll('#caption-results .caption'), (c) => Math.round(c.getBoundingClientRect().left));
  if (new Set(lefts).size > 1) faults.push(`captions out of line: left edges ${[...new Set(lefts)]}`);
  for (const label of document.querySelectorAll('.cell .label')) {  // a shown label stays inside its photo
    const l = label.getBoundingClientRect(), t = label.closest('.thumb').getBoundingClientRect();
    if (getComputedStyle(label).display !== 'none' && (l.left < t.left - 1 || l.right > t.right + 1))
      faults.push(`overlay label "${label.textContent}" is cut at the photo's edge`);
  }
  return faults;
}"""


def _state(page, name: str) -> None:
    """Screenshot the page as it is now into test-artifacts/NAME.png, then check it for layout faults."""
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    assert page.evaluate(LAYOUT_FAULTS) == [], name


def _rewrite(page, path: str, change) -> None:
    """Let the real server answer ``path``, then hand the page ``change(json)`` instead (fields the API may add)."""
    def handle(route):
        response = route.fetch()
        assert response.ok, (response.status, response.text()[:300])
        route.fulfill(response=response, body=json.dumps(change(response.json())),
                      headers={**response.headers, "content-type": "application/json"})
    page.route(f"**{path}", handle)


def _min_score_api(page, threshold: float) -> list:
    """Answer /search/text as a server that leaves weak results out would: the server's results less those whose
    global score is below ``threshold`` (all of them when the page sends min_score -1), with ``min_score``,
    ``below_min_score`` (not a field of the real API; the page reads it when present) and ``no_match``. Returns
    the min_score of each request, as the page sent it."""
    sent = []

    def handle(route):
        body = route.request.post_data_json
        sent.append(body.pop("min_score", None))
        response = route.fetch(post_data=json.dumps(body))
        answer = response.json()
        applied = threshold if sent[-1] is None else sent[-1]
        kept = [r for r in answer["results"] if r["global_score"] >= applied]
        answer.update(results=kept, min_score=applied, below_min_score=len(answer["results"]) - len(kept),
                      no_match=not kept)
        route.fulfill(response=response, body=json.dumps(answer),
                      headers={**response.headers, "content-type": "application/json"})
    page.route("**/search/text", handle)
    return sent


def _chip_words(card) -> list[str]:
    return card.locator(".legend .chip .w").all_inner_texts()


@pytest.mark.slow
def test_search_page_states_and_layout(browser, page_server, built):  # browser first: skip early
    from alignsearch.indexer.index import Index

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
    _state(page, "0-empty")

    # without the key the API refuses, and the page says so (and opens its settings, where the key goes)
    page.fill("#query", query)
    page.click("#search-button")
    page.wait_for_selector("#text-status.error")
    assert "401" in page.inner_text("#text-status") and page.locator("#settings[open]").count() == 1
    page.fill("#api-key", KEY)
    _state(page, "5-settings")

    # 1. text -> ranked thumbnails with scores (fetched with the key, since an <img> cannot send it)
    page.click("#search-button")
    page.wait_for_selector("#image-results figure.card img")
    cards = page.locator("#image-results figure.card")
    assert cards.count() == min(12, N_IMAGES)
    _all_images_loaded(page, "#image-results img")
    scores = [float(re.search(r"score (-?[0-9.]+)", t).group(1))
              for t in page.locator("#image-results .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    ids = cards.evaluate_all("cards => cards.map(c => c.dataset.id)")
    assert target in ids[:3]  # a caption finds its own image near the top
    assert len(set(ids)) == len(ids) and set(ids) <= {r[0] for r in index.conn.execute("SELECT id FROM images")}
    assert page.locator(".cell").count() == 0 and page.locator("#text-notice").is_hidden()
    assert "images in" in page.inner_text("#text-status")
    _state(page, "1-text-results")

    # 2. the overlay: each content word the API grounded (no stopwords) is drawn on its cell, in its chip's
    # colour, named on hover
    page.fill("#query", "a dog runs through the grass")
    with page.expect_response("**/search/text") as answer:
        page.check("#explain")
    grounding = answer.value.json()["results"][0]["grounding"]
    page.wait_for_selector("#image-results .cell")
    _all_images_loaded(page, "#image-results img")
    first = cards.first
    shown = [g["word"] for g in grounding if g.get("cell")]
    assert _chip_words(first) == shown and {"dog", "grass"} <= set(shown)
    assert not {"a", "through", "the"} & set(shown)  # whole content words only
    assert sorted(first.locator(".mark").evaluate_all("m => m.map(x => x.dataset.word)")) == sorted(shown)
    chip_hues = first.locator(".chip").evaluate_all("cs => cs.map(c => c.style.getPropertyValue('--hue'))")
    mark_hues = first.locator(".mark").evaluate_all(
        "ms => Object.fromEntries(ms.map(m => [m.dataset.i, m.style.getPropertyValue('--hue')]))")
    assert [mark_hues[str(i)] for i in range(len(shown))] == chip_hues and len(set(chip_hues)) == len(shown)
    img = first.locator("img").bounding_box()
    for cell in first.locator(".cell").all():  # inside the picture, one 7 x 7 grid cell each
        box = cell.bounding_box()
        assert box["width"] == pytest.approx(img["width"] / 7, abs=1.5)
        assert img["x"] - 1 <= box["x"] and box["x"] + box["width"] <= img["x"] + img["width"] + 1
        cell.hover()  # its label shows, inside the photo (checked by the layout check in _state too)
        label = cell.locator(".label").bounding_box()
        assert img["x"] - 1 <= label["x"] and label["x"] + label["width"] <= img["x"] + img["width"] + 1
    dog = first.locator(".cell[data-word~='dog']")
    page.mouse.move(0, 0)
    assert not dog.locator(".label").is_visible()
    dog.hover()
    assert dog.locator(".label").is_visible() and "dog" in dog.locator(".label").inner_text()
    _state(page, "2-grounding-overlay")
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
    _state(page, "3-image-to-captions")

    # 4. drag and drop another photo onto the drop zone
    other = "chelsea.png"  # a sample photo whose own caption the default model ranks first
    assert other != target and index.image_by_id(other) is not None
    _drop_file(page, "#drop-zone", index.images_root / other)
    page.wait_for_function("id => document.querySelector('#caption-results li')?.dataset.id.startsWith(id + '#')",
                           arg=other)
    assert "over" not in page.get_attribute("#drop-zone", "class")
    _state(page, "4-dropped-image")

    assert outside == []  # no asset from outside the server
    assert errors == []
    page.close()


@pytest.mark.slow
def test_search_page_with_confidences_weak_matches_and_a_narrow_screen(browser, page_server, built):
    from alignsearch.indexer.index import Index

    index = Index(built)
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_server + "/")
    page.click("#settings summary")
    page.fill("#api-key", KEY)

    # words sharing a cell at the photo's right edge, with confidences (the shape the API grows for issue 9)
    def shared_cell(body: dict) -> dict:
        body["results"][0]["grounding"] = [
            {"word": "motorcycle", "region": 20, "similarity": 0.41, "confidence": 0.83, "cell": [2, 6], "grid": [7, 7]},
            {"word": "helmet", "region": 20, "similarity": 0.22, "confidence": 0.12, "cell": [2, 6], "grid": [7, 7]},
            {"word": "rider", "region": 42, "similarity": 0.30, "confidence": 0.35, "cell": [6, 0], "grid": [7, 7]},
        ]
        return body
    _rewrite(page, "/search/text", shared_cell)
    page.check("#explain")
    page.fill("#query", "a rider with a helmet on a motorcycle")
    page.click("#search-button")
    page.wait_for_selector("#image-results .card .mark")
    _all_images_loaded(page, "#image-results img")
    first = page.locator("#image-results .card").first
    assert _chip_words(first) == ["motorcycle", "helmet", "rider"]
    assert first.locator(".chip .conf").all_inner_texts() == ["83%", "12%", "35%"]
    shared = first.locator(".cell[data-cell='2,6']")
    assert shared.locator(".mark").count() == 2
    hues = shared.locator(".mark").evaluate_all("ms => ms.map(m => m.style.getPropertyValue('--hue'))")
    chips = first.locator(".chip").evaluate_all("cs => cs.map(c => c.style.getPropertyValue('--hue'))")
    assert hues == chips[:2] and hues[0] != hues[1]  # each word keeps its own colour in the shared cell
    first.locator(".chip", has_text="helmet").hover()
    assert shared.locator(".label").inner_text() == "motorcycle 83% · helmet 12%"
    _state(page, "7-overlay-shared-cell")  # the label at the right edge is checked to stay inside the photo
    page.unroute("**/search/text")

    # nothing clears the API's match threshold: the page says so, and shows the closest on request, dimmed
    sent = _min_score_api(page, 0.99)
    page.uncheck("#explain")
    page.fill("#query", "zzzz qqqq")
    page.click("#search-button")
    page.wait_for_selector("#text-notice.warn:not([hidden])")
    assert page.inner_text("#text-notice").startswith("No good match")
    assert "0.99" in page.inner_text("#text-notice") and page.locator("#image-results .card").count() == 0
    _state(page, "6-no-good-match")
    page.click("#text-notice button", timeout=5000)
    page.wait_for_selector("#image-results .card")
    assert sent[-2:] == [None, -1]  # the page asks again, for every result
    assert page.locator("#image-results .card.weak").count() == page.locator("#image-results .card").count() == 12
    assert "None of these images clears the match threshold" in page.inner_text("#text-notice")
    _all_images_loaded(page, "#image-results img")
    _state(page, "6b-closest-anyway")
    page.unroute("**/search/text")

    # some clear it: the page says how many were left out, and marks them when shown
    scores = {r["id"]: r["global_score"] for r in httpx.post(
        page_server + "/search/text", json={"query": "a dog", "k": 12},
        headers={"Authorization": f"Bearer {KEY}"}).raise_for_status().json()["results"]}
    threshold = sorted(scores.values(), reverse=True)[3]
    _min_score_api(page, threshold)
    page.fill("#query", "a dog")
    page.click("#search-button")
    page.wait_for_selector("#text-notice.info:not([hidden])")
    kept = page.locator("#image-results .card").count()
    assert kept == sum(v >= threshold for v in scores.values()) >= 4
    assert page.inner_text("#text-notice").startswith(f"{12 - kept} weaker images left out")
    page.click("#text-notice button")
    page.wait_for_function("document.querySelectorAll('#image-results .card').length === 12")
    marked = page.locator("#image-results .card").evaluate_all(
        "cs => Object.fromEntries(cs.map(c => [c.dataset.id, !!c.querySelector('.badge')]))")
    assert marked == {i: v < threshold for i, v in scores.items()}
    assert page.locator("#text-notice").is_hidden()
    _state(page, "6c-weaker-shown")
    page.unroute("**/search/text")

    # captions with and without a photo line up; a caption without one keeps the thumbnail column
    photo = index.images_root / index.conn.execute("SELECT id FROM images ORDER BY row LIMIT 1").fetchone()[0]
    body = httpx.post(page_server + "/search/image", files={"file": photo.read_bytes()}, data={"k": "12"},
                      headers={"Authorization": f"Bearer {KEY}"}).raise_for_status().json()
    body["results"] = [{**r, "image_id": None} if i % 3 == 1 else r for i, r in enumerate(body["results"])]
    # (a browser-side rewrite would lose the uploaded file: the server's own answer is replayed instead)
    page.route("**/search/image", lambda route: route.fulfill(status=200, content_type="application/json",
                                                              body=json.dumps(body)))
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#caption-results .mini.none")
    _all_images_loaded(page, "#caption-results img")
    _state(page, "3b-captions-with-and-without-photos")
    page.close()

    # a phone-sized screen: everything stacks, nothing sticks out
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_server + "/")
    _state(page, "8a-narrow-empty")
    page.click("#settings summary")
    page.fill("#api-key", KEY)
    page.fill("#k", "3")  # (thumbnails load lazily: three fit on a phone's screen)
    _state(page, "8b-narrow-settings")
    page.check("#explain")
    page.fill("#query", "a dog runs through the grass")
    page.click("#search-button")
    page.wait_for_selector("#image-results .cell")
    _all_images_loaded(page, "#image-results img")
    last = page.locator("#image-results .card").first.locator(".cell").last
    last.hover()
    _state(page, "8c-narrow-results")
    assert errors == []
    page.close()


def test_the_schema_states_what_the_routes_refuse(page_server):
    """A blank query and a string that is not base64 are refused by the schema itself (422), and the schema says
    so: a client generated from it never sends them."""
    spec = httpx.get(page_server + "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    query = schemas["TextSearchRequest"]["properties"]["query"]
    assert query["minLength"] == 1 and query["pattern"] == r"\S"
    for path in ("/search/image", "/search/similar"):  # their JSON bodies
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        prop = body["properties"]["image_base64"]
        prop = next((p for p in prop.get("anyOf", [prop]) if p.get("type") == "string"), prop)
        assert prop["minLength"] == 4 and prop["pattern"].startswith("^[A-Za-z0-9+/]"), path
    assert "400" in spec["paths"]["/search/text"]["post"]["responses"]
    for body in ({"query": "   "}, {"query": ""}):
        r = httpx.post(page_server + "/search/text", json=body, headers={"Authorization": "Bearer " + KEY})
        assert r.status_code == 422 and "query" in r.text, r.text
    r = httpx.post(page_server + "/search/image", json={"image_base64": "00"}, headers={"Authorization": "Bearer " + KEY})
    assert r.status_code == 422 and "image_base64" in r.text
