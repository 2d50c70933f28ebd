"""Photos added, re-described and removed over HTTP (a real uvicorn server on 127.0.0.1 over an index of its
own): searchable when the 201 comes, through the index's crash-safe updates (`index verify` passes after)."""

from __future__ import annotations

import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi import HTTPException
from PIL import Image

from conftest import sample_files
from alignsearch.cli import main
from alignsearch.indexer.index import verify
from alignsearch.service.launch import serve
from alignsearch.service.routes import get_writer
from alignsearch.service.settings import Settings
from alignsearch.service.state import AppState

KEY = "write-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def index_dir(photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("writes")
    images = root / "images"
    images.mkdir()
    for path in sample_files(photos[0])[:3]:
        shutil.copy(path, images / path.name)
    assert main(["index", "build", "--images", str(images), "--out", str(root / "index"), "--quiet"]) == 0
    # what a server killed mid-update leaves: a photo written for an update that never committed (removed when
    # the next server starts), beside a file of the user's own that is no upload (left alone)
    (images / "uploads").mkdir()
    (images / "uploads" / f"{'ab' * 12}.png").write_bytes(_png("black"))
    (images / "uploads" / "mine.png").write_bytes(_png("white"))
    return root / "index"


@pytest.fixture(scope="module")
def server(index_dir):
    with serve(index_dir, env={"ALIGNSEARCH_API_KEY": KEY, "ALIGNSEARCH_REQUEST_TIMEOUT_S": "300",
                               "ALIGNSEARCH_WRITE_BATCH_MS": "1500"}, ready_timeout=600) as url:
        yield url


def _png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, format="PNG")
    return buf.getvalue()


def _post(server, data: bytes, **fields) -> httpx.Response:
    return httpx.post(f"{server}/images", files={"file": ("p.png", data, "image/png")},
                      data={k: json.dumps(v) for k, v in fields.items()}, headers=AUTH, timeout=600)


def _find(server, filter_) -> list[str]:
    r = httpx.post(f"{server}/search/text", json={"query": "a photo", "k": 20, "filter": filter_}, headers=AUTH,
                   timeout=300)
    assert r.status_code == 200, r.text
    return [h["id"] for h in r.json()["results"]]


def test_add_patch_delete_a_photo(server, index_dir):
    data = _png("purple")
    r = _post(server, data, captions=["a purple square"], metadata={"album": "new", "rating": 5})
    assert r.status_code == 201, r.text
    body = r.json()
    image_id = body["id"]
    assert image_id.startswith("uploads/") and body["created"] and body["metadata"]["album"] == "new"
    assert _find(server, {"must": [{"key": "album", "match": {"value": "new"}}]}) == [image_id]  # at once
    assert httpx.get(f"{server}{body['uri']}", headers=AUTH, timeout=60).content == data
    again = _post(server, data)
    assert again.status_code == 200 and again.json()["id"] == image_id and not again.json()["created"]
    r = httpx.patch(f"{server}/images/{image_id}/metadata", json={"album": "other", "rating": None}, headers=AUTH,
                    timeout=600)
    assert r.status_code == 200 and r.json()["metadata"]["album"] == "other" and "rating" not in r.json()["metadata"]
    assert _find(server, {"must": [{"key": "album", "match": {"value": "other"}}]}) == [image_id]
    bad = httpx.patch(f"{server}/images/{image_id}/metadata", json={"width": "wide"}, headers=AUTH, timeout=60)
    assert bad.status_code == 422 and "'width' is a number" in bad.json()["detail"]
    assert _post(server, data, metadata={"rating": "high"}).status_code == 422
    r = httpx.delete(f"{server}/images/{image_id}", headers=AUTH, timeout=600)
    assert r.status_code == 200 and r.json()["captions_deleted"] == 1
    assert image_id not in _find(server, {})
    assert httpx.get(f"{server}/images/{image_id}", headers=AUTH, timeout=60).status_code == 404
    assert httpx.delete(f"{server}/images/{image_id}", headers=AUTH, timeout=60).status_code == 404
    back = _post(server, data, captions=["a purple square"], metadata={"album": "back"})  # deleted, then sent again
    assert back.status_code == 201 and back.json()["id"] == image_id and back.json()["created"], back.text
    assert _find(server, {"must": [{"key": "album", "match": {"value": "back"}}]}) == [image_id]
    assert httpx.get(f"{server}/images/{image_id}", headers=AUTH, timeout=60).content == data
    assert verify(index_dir) == []


def test_bad_uploads_and_missing_keys_are_refused(server):
    assert httpx.post(f"{server}/images", files={"file": ("x.png", b"not an image", "image/png")}, headers=AUTH,
                      timeout=60).status_code == 415
    assert httpx.post(f"{server}/images", files={"file": ("p.png", _png("red"), "image/png")},
                      timeout=60).status_code == 401
    assert _post(server, _png("red"), captions={"not": "a list"}).status_code == 422
    assert httpx.patch(f"{server}/images/none.png/metadata", json={"a": 1}, headers=AUTH, timeout=60).status_code == 404


def test_writes_are_off_without_a_key_unless_allowed():
    with pytest.raises(HTTPException) as info:
        get_writer(AppState(Settings(api_key=None, allow_writes=False)))
    assert info.value.status_code == 403
    with pytest.raises(HTTPException) as info:  # allowed, but the index is not loaded yet
        get_writer(AppState(Settings(api_key=None, allow_writes=True)))
    assert info.value.status_code == 503


def test_the_client_adds_describes_and_deletes(server):
    from alignsearch.service.client import AlignSearchClient, AlignSearchError

    with AlignSearchClient(server, api_key=KEY, timeout=600) as c:
        added = c.add_image(_png("orange"), captions=["an orange square"], metadata={"tags": ["x", "y"]})
        assert added["created"] and added["metadata"]["tags"] == ["x", "y"]
        found = c.search_text("a square", k=5, filter={"must": [{"key": "tags", "match": {"value": "y"}}]})
        assert [r["id"] for r in found["results"]] == [added["id"]]
        assert c.set_metadata(added["id"], {"tags": "z"})["metadata"]["tags"] == "z"
        assert c.delete_image(added["id"])["id"] == added["id"]
        with pytest.raises(AlignSearchError) as info:
            c.delete_image(added["id"])
        assert info.value.status == 404


def _group_sizes(server) -> tuple[float, float]:
    """(updates committed for uploads, uploads in them) from /metrics."""
    text = httpx.get(f"{server}/metrics", headers=AUTH, timeout=60).text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("alignsearch_write_group_size_")}
    return values.get("alignsearch_write_group_size_count", 0.0), values.get("alignsearch_write_group_size_sum", 0.0)


def test_concurrent_uploads_are_one_update_and_a_bad_one_fails_alone(server, index_dir):
    images = index_dir.parent / "images"
    assert not (images / "uploads" / f"{'ab' * 12}.png").exists()  # swept at start
    assert (images / "uploads" / "mine.png").exists()
    updates, uploads = _group_sizes(server)
    colours = ["#102030", "#405060", "#708090", "#a0b0c0", "#d0e0f0", "#f01020"]
    with ThreadPoolExecutor(len(colours) + 1) as pool:
        bad = pool.submit(_post, server, _png("#123456"), metadata={"width": "wide"})  # a built-in number field
        answers = list(pool.map(lambda c: _post(server, _png(c), captions=[f"a square of {c}"],
                                                metadata={"album": "grouped"}), colours))
    assert [r.status_code for r in answers] == [201] * len(colours), [r.text for r in answers]
    assert bad.result().status_code == 422 and "wide" not in bad.result().json()["detail"]
    after = _group_sizes(server)
    assert after[1] - uploads == len(colours)  # the bad one never joined a group
    assert after[0] - updates < len(colours)  # fewer updates than uploads: grouped
    found = _find(server, {"must": [{"key": "album", "match": {"value": "grouped"}}]})
    assert sorted(found) == sorted(r.json()["id"] for r in answers)  # all searchable when answered
    assert verify(index_dir) == []


def test_a_group_whose_update_fails_once_is_committed_again(caplog):
    """An update is a transaction, so a group whose update failed (the index left as it was) is committed again
    once before its requests get the error; a second failure reaches them."""
    import asyncio
    from types import SimpleNamespace

    from alignsearch.service.writes import Writer

    class Follower:
        searcher = SimpleNamespace(index=SimpleNamespace(field_types={}))

        async def check(self) -> None:
            return None

    async def scenario(failures: int) -> list:
        writer = Writer(Follower(), window_s=0.05)
        calls = []

        def commit(group):
            calls.append(len(group))
            if len(calls) <= failures:
                raise RuntimeError("a transient failure")
            return [True] * len(group)

        writer._commit_group = commit
        results = await asyncio.gather(*(writer.add(_png(c), "PNG", [], {}) for c in ("red", "blue")),
                                       return_exceptions=True)
        writer.close()
        return [calls, results]

    calls, results = asyncio.run(scenario(1))
    assert calls == [2, 2] and [created for _, created in results] == [True, True]
    assert "committing it again" in caplog.text
    calls, results = asyncio.run(scenario(2))
    assert calls == [2, 2] and all(isinstance(r, RuntimeError) for r in results)
