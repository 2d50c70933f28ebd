"""Filters, pages and "more like this" over HTTP: a real uvicorn server on 127.0.0.1 over the small real index
(photos in the root and in sub/, a 'source' column), called with the shipped client."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from conftest import N_IMAGES
from alignsearch.service.client import AlignSearchClient, AlignSearchError, AsyncAlignSearchClient
from alignsearch.service.launch import serve

KEY = "filter-key"
IN_SUB = {"must": [{"key": "folder", "prefix": "sub"}]}


@pytest.fixture(scope="module")
def server(built):
    with serve(built, "--batch-wait-ms", "10", env={"ALIGNSEARCH_API_KEY": KEY, "ALIGNSEARCH_REQUEST_TIMEOUT_S": "300"},
               ready_timeout=600) as url:
        yield url


@pytest.fixture()
def client(server):
    with AlignSearchClient(server, api_key=KEY, timeout=300) as c:
        yield c


def test_a_filter_keeps_only_matching_photos(client, built):
    from alignsearch.indexer.index import Index

    in_sub = {r[0] for r in Index(built).conn.execute("SELECT id FROM images WHERE id LIKE 'sub/%'")}
    res = client.search_text("a photo", k=10, candidates=N_IMAGES, filter=IN_SUB)
    assert {r["id"] for r in res["results"]} == in_sub and res["total"] == len(in_sub)
    assert all(r["metadata"]["folder"] == "sub" for r in res["results"]) and res["has_more"] is False
    none = client.search_text("a photo", filter={"must_not": [{"key": "source", "match": {"value": "demo"}}]})
    assert none["results"] == [] and none["total"] == 0  # every photo has a demo caption
    captions = client.search_image(_any_photo(built)[1], k=50, candidates=50, filter=IN_SUB)
    assert captions["results"] and all(r["image_id"].startswith("sub/") for r in captions["results"])


def _any_photo(built):
    """(id, file) of the first indexed photo."""
    from alignsearch.indexer.index import Index

    index = Index(built)
    row = index.conn.execute("SELECT id, path FROM images ORDER BY row LIMIT 1").fetchone()
    return row[0], index.images_root / row[1]


def test_pages_are_ranks_of_one_ranking(client):
    whole = client.search_text("a dog on the grass", k=9, candidates=N_IMAGES)
    pages, offset = [], 0
    while offset is not None:
        page = client.search_text("a dog on the grass", k=4, candidates=N_IMAGES, offset=offset)
        pages.append(page)
        offset = page["next_offset"]
    assert [r["id"] for p in pages for r in p["results"]][:9] == [r["id"] for r in whole["results"]]
    ranks = [r["rank"] for p in pages for r in p["results"]]
    assert ranks == list(range(1, N_IMAGES + 1)) and pages[-1]["has_more"] is False
    assert pages[0]["total"] == N_IMAGES and pages[0]["has_more"] is True and pages[1]["offset"] == 4


def _post(server, body, path="/search/text") -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


@pytest.mark.parametrize("filter_, loc, message", [
    ({"must": [{"key": "zzz-secret-field", "match": {"value": "x"}}]}, ["body", "filter", "must", 0, "key"],
     "unknown field"),
    ({"must": [{"key": "folder", "match": {"value": 3}}]}, ["body", "filter", "must", 0, "match", "value"],
     "'folder' is a string"),
    ({"must": [{"key": "width", "range": {"gt": "wide-secret"}}]}, ["body", "filter", "must", 0, "range", "gt"],
     "'width' is a number"),
    ({"must": [{"key": "folder", "prefix": "a", "match": {"value": "b"}}]}, ["body", "filter", "must", 0], "exactly one"),
    ({"must": {"key": "folder"}}, ["body", "filter", "must", 0], "exactly one"),
])
def test_bad_filters_are_422_naming_where(server, filter_, loc, message):
    for path, body in (("/search/text", {"query": "a dog", "filter": filter_}), ("/search/similar", {"id": "x", "filter": filter_})):
        r = _post(server, body, path)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"][0]
        assert detail["loc"] == loc and message in detail["msg"]
        assert "secret" not in r.text  # the input is never copied


@pytest.mark.parametrize("body", [{"query": "a", "filter": "nope"}, {"query": "a", "filter": [1]},
                                  {"query": "a", "offset": -1}, {"query": "a", "k": 50, "offset": 990}])
def test_malformed_pages_and_filters_are_422(server, body):
    assert _post(server, body).status_code == 422


def test_more_like_this_by_id_and_by_upload(client, built):
    image_id, photo = _any_photo(built)
    res = client.search_similar(image_id=image_id, k=N_IMAGES)
    ids = [r["id"] for r in res["results"]]
    assert image_id not in ids and len(ids) == N_IMAGES - 1 and res["total"] == N_IMAGES - 1
    scores = [r["score"] for r in res["results"]]
    assert scores == sorted(scores, reverse=True) and all(r["local_score"] == 0 for r in res["results"])
    page2 = client.search_similar(image_id=image_id, k=3, offset=3)
    assert [r["id"] for r in page2["results"]] == ids[3:6] and page2["next_offset"] == 6
    uploaded = client.search_similar(image=photo, k=3)
    assert uploaded["results"][0]["id"] == image_id and uploaded["results"][0]["score"] > 0.95  # itself, re-encoded
    sub = client.search_similar(image_id=image_id, k=N_IMAGES, filter=IN_SUB)
    assert sub["results"] and all(r["id"].startswith("sub/") for r in sub["results"])
    with pytest.raises(AlignSearchError) as info:
        client.search_similar(image_id="no/such/photo.jpg")
    assert info.value.status == 404


def test_similar_needs_exactly_one_query(server):
    assert _post(server, {"k": 3}, "/search/similar").status_code == 422
    assert _post(server, {"id": "x", "image_base64": "eA=="}, "/search/similar").status_code == 422
    r = httpx.post(f"{server}/search/similar", content=b"x", headers={"Authorization": f"Bearer {KEY}",
                                                                        "content-type": "text/plain"}, timeout=30)
    assert r.status_code == 415


def test_concurrent_filters_share_batches_without_mixing(server):
    async def run():
        async with AsyncAlignSearchClient(server, api_key=KEY) as c:
            calls = [c.search_text("a photo", k=N_IMAGES, candidates=N_IMAGES, filter=IN_SUB if i % 2 else None,
                                   offset=i % 3) for i in range(12)]
            return await asyncio.gather(*calls)

    for i, res in enumerate(asyncio.run(run())):
        assert res["offset"] == i % 3
        if i % 2:
            assert res["total"] == 4 and all(r["id"].startswith("sub/") for r in res["results"])
        else:
            assert res["total"] == N_IMAGES and len(res["results"]) == N_IMAGES - i % 3
