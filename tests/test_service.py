"""End-to-end: a real uvicorn server on 127.0.0.1 over a small real index, called with the shipped client."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import time

import httpx
import pytest
from PIL import Image

from conftest import N_IMAGES, default_grid
from alignsearch.service.launch import serve
from alignsearch.service.client import AlignSearchClient, AlignSearchError, AsyncAlignSearchClient

KEY = "test-key"
MAX_UPLOAD = 2_000_000


@pytest.fixture(scope="module")
def server(built):
    with serve(built, "--max-upload-bytes", str(MAX_UPLOAD), "--batch-wait-ms", "10",
               env={"ALIGNSEARCH_MAX_PIXELS": "1000000", "ALIGNSEARCH_API_KEY": KEY}) as url:
        yield url


@pytest.fixture()
def client(server):
    with AlignSearchClient(server, api_key=KEY) as c:
        yield c


def _caption_of_some_image(built):
    from alignsearch.indexer.index import Index

    return Index(built).conn.execute(
        "SELECT text, image_id FROM captions WHERE image_id IS NOT NULL ORDER BY row LIMIT 1 OFFSET 7").fetchone()


def test_text_search_returns_ranked_images(client, built):
    row = _caption_of_some_image(built)
    res = client.search_text(row["text"], k=5, candidates=N_IMAGES)
    scores = [r["score"] for r in res["results"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert [r["rank"] for r in res["results"]] == [1, 2, 3, 4, 5]
    assert row["image_id"] in [r["id"] for r in res["results"][:3]]  # a caption finds its own image near the top
    first = res["results"][0]
    assert first["uri"].startswith("/images/") and first["metadata"]["width"] > 0
    assert set(res["timings_ms"]) == {"encode", "coarse", "rerank", "total"}
    assert res["truncated"] is False


def test_explain_grounds_each_word_in_a_grid_cell(client):
    res = client.search_text("a dog runs on the grass", k=2, candidates=10, explain=True)
    grounding = res["results"][0]["grounding"]
    assert [g["word"] for g in grounding] == ["dog", "runs", "grass"]  # whole words, stopwords left out
    rows, cols = default_grid()
    assert all(1 / (rows * cols) <= g["confidence"] <= 1.0 for g in grounding)
    assert all(g["grid"] == [rows, cols] and g["cell"] == [g["region"] // cols, g["region"] % cols] for g in grounding)


def test_nonsense_matches_nothing_and_real_queries_keep_their_hits(client):
    nonsense = client.search_text("zzzz qqqq", k=5, candidates=N_IMAGES)
    assert len(nonsense["results"]) == 5 and nonsense["no_match"] is True and nonsense["match_test"] == "reference"
    assert all(r["match"] is False and 0 <= r["relevance"] <= 100 for r in nonsense["results"])
    real = client.search_text("a red motorcycle", k=5, candidates=N_IMAGES)
    assert real["no_match"] is False and real["match_test"] == "reference"
    assert real["min_score"] != nonsense["min_score"]  # the reference test's threshold is the query's own
    assert real["results"][0]["match"] is True and real["results"][0]["id"].endswith("motorcycle_right.png")
    assert all(r["match"] == (r["global_score"] >= real["min_score"]) for r in real["results"])
    assert real["results"][0]["relevance"] > max(r["relevance"] for r in nonsense["results"])
    lowered = client.search_text("zzzz qqqq", k=5, candidates=N_IMAGES, min_score=-1)
    assert lowered["no_match"] is False and lowered["match_test"] == "min_score" and lowered["min_score"] == -1
    assert all(r["match"] for r in lowered["results"])


def test_image_search_says_how_strong_its_captions_are(client, built):
    from alignsearch.indexer.index import Index

    res = client.search_image(next(Index(built).images_root.rglob("coffee.png")), k=5, candidates=100)
    assert res["match_test"] == "reference" and isinstance(res["min_score"], float)
    assert all(r["match"] == (r["global_score"] >= res["min_score"]) for r in res["results"])
    assert all(0 <= r["relevance"] <= 100 for r in res["results"])
    assert res["no_match"] is (not any(r["match"] for r in res["results"]))


@pytest.mark.parametrize("bad", [1.5, -2, "high", None])
def test_min_score_out_of_range_is_a_clear_4xx(server, bad):
    body = {"query": "a dog", "min_score": bad}
    r = httpx.post(f"{server}/search/text", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    if bad is None:  # null: the model's default
        assert r.status_code == 200 and r.json()["min_score"] is not None
    else:
        assert r.status_code == 422 and "min_score" in r.text and "Traceback" not in r.text


def test_image_search_finds_its_own_captions(client, built):
    row = _caption_of_some_image(built)
    from alignsearch.indexer.index import Index

    path = Index(built).images_root / row["image_id"]
    res = client.search_image(path, k=5, candidates=100)
    assert [r["image_id"] for r in res["results"]].count(row["image_id"]) >= 2
    scores = [r["score"] for r in res["results"]]
    assert scores == sorted(scores, reverse=True)
    as_json = client.http.post("/search/image", headers={"Authorization": f"Bearer {KEY}"},
                         json={"image_base64": base64.b64encode(path.read_bytes()).decode(), "k": 5})
    assert as_json.status_code == 200
    assert [r["id"] for r in as_json.json()["results"]] == [r["id"] for r in res["results"]]


def test_served_image_is_the_indexed_file_and_traversal_is_refused(client, built, server):
    from alignsearch.indexer.index import Index

    index = Index(built)
    image_id = index.conn.execute("SELECT id FROM images WHERE id LIKE 'sub/%' LIMIT 1").fetchone()[0]
    assert client.image(image_id) == (index.images_root / image_id).read_bytes()
    headers = {"Authorization": f"Bearer {KEY}"}
    for path in ("/images/../../../etc/passwd", "/images/%2e%2e/%2e%2e/etc/passwd", "/images/nope.jpg"):
        assert httpx.get(server + path, headers=headers).status_code == 404, path


def _status(server, method="post", path="/search/text", key=KEY, headers=None, **kw) -> httpx.Response:
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    return httpx.request(method.upper(), server + path, headers=headers, timeout=30, **kw)


@pytest.mark.parametrize("body", [
    {"query": ""}, {"query": "   \n"}, {"query": "dog", "k": 0}, {"query": "dog", "k": 101},
    {"query": "dog", "candidates": 5000}, {"query": "dog", "k": 20, "candidates": 10},
    {"query": "dog", "colour": "red"}, {}, {"query": 3},
])
def test_bad_text_queries_are_422(server, body):
    response = _status(server, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


def test_long_query_is_truncated_and_says_so(client):
    res = client.search_text("a dog " * 200, k=3)
    assert res["truncated"] is True and len(res["results"]) == 3


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, format="PNG")
    return buf.getvalue()


def test_bad_uploads_get_clear_4xx(server):
    files = lambda data: {"files": {"file": ("x.jpg", data, "image/jpeg")}}  # noqa: E731
    cases = [
        (files(b"this is not an image"), 415, "not a JPEG, PNG, WebP, GIF or BMP image"),
        (files(b""), 400, "empty"),
        (files(os.urandom(MAX_UPLOAD + 10)), 413, "upload limit"),
        (files(_png(2000, 2000)), 413, "pixel limit"),  # a decompression bomb, scaled down: 4 Mpx > 1 Mpx limit
        ({"json": {"image_base64": "***not base64***"}}, 422, "image_base64"),  # the schema's pattern
        ({"json": {"image_base64": "AAAAA"}}, 400, "not valid base64"),  # the alphabet, but not whole groups
        ({"json": {"image_base64": base64.b64encode(_png(32, 32)).decode(), "k": 0}}, 422, ""),
        ({"files": {"other": ("x", b"abc")}}, 422, "file"),
        ({"content": b"raw bytes", "headers": {"content-type": "image/jpeg"}},
         415, "multipart"),
    ]
    for kwargs, status, message in cases:
        response = _status(server, path="/search/image", **kwargs)
        assert response.status_code == status, (status, response.text[:300])
        assert message in str(response.json()["detail"])


def test_api_key_is_required_but_health_is_open(server, built):
    assert _status(server, json={"query": "dog"}, key=None).status_code == 401
    assert _status(server, json={"query": "dog"}, key="wrong").status_code == 401
    assert _status(server, "get", "/healthz", key=None).status_code == 200
    from alignsearch.indexer.index import Index

    captions = Index(built).manifest["counts"]["captions"]
    open_ready = _status(server, "get", "/readyz", key=None).json()  # the counts, for the page; not the index
    assert open_ready == {"status": "ready", "images": N_IMAGES, "captions": captions}
    ready = _status(server, "get", "/readyz").json()
    assert ready["images"] == N_IMAGES and ready["status"] == "ready" and ready["index"] == built.name
    assert _status(server, "get", "/metrics", key=None).status_code == 401
    assert "openapi" in _status(server, "get", "/openapi.json", key=None).json()
    with pytest.raises(AlignSearchError) as err:
        AlignSearchClient(server).search_text("dog")
    assert err.value.status == 401


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_load_with_concurrent_clients_batches_and_has_no_errors(server):
    requests_total, concurrency, time_limit = 240, 16, 240.0
    queries = ["a dog runs", "two children play", "a man rides a bike", "people at the beach",
               "a girl in a pink dress", "a black and white dog", "a crowd in the street", "a boy jumps"]

    async def run() -> tuple[int, int, float]:
        errors, done = 0, 0
        counter = iter(range(requests_total))
        async with AsyncAlignSearchClient(server, api_key=KEY, timeout=60) as c:
            async def worker() -> None:
                nonlocal errors, done
                for i in counter:
                    try:
                        res = await c.search_text(queries[i % len(queries)], k=5, candidates=16)
                        assert len(res["results"]) == 5
                        done += 1
                    except Exception:  # noqa: BLE001  (counted, reported below)
                        errors += 1

            start = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), time_limit)
            return errors, done, time.perf_counter() - start

    errors, done, seconds = asyncio.run(run())
    metrics = _status(server, "get", "/metrics").text
    batches = _metric(metrics, "alignsearch_batch_size_count", kind="text")
    queued = _metric(metrics, "alignsearch_batch_size_sum", kind="text")
    singles = _metric(metrics, "alignsearch_batch_size_bucket", kind="text", le="1.0")
    print(f"load: {done} ok, {errors} errors in {seconds:.1f}s ({done / seconds:.1f} req/s); "
          f"{batches:.0f} batches, mean {queued / batches:.2f} queries per forward pass")
    assert errors == 0 and done == requests_total
    assert batches < queued and singles < batches  # micro-batching ran batches larger than one
    assert _metric(metrics, "alignsearch_requests_total", endpoint="/search/text", status="200") >= requests_total
    assert re.search(r'alignsearch_stage_seconds_count\{endpoint="/search/text",stage="rerank"\}', metrics)
