"""Photos added, re-described and removed over HTTP (a real uvicorn server on 127.0.0.1 over an index of its
own): searchable when the 201 comes, through the index's crash-safe updates (`index verify` passes after)."""

from __future__ import annotations

import io
import json
import shutil

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
    return root / "index"


@pytest.fixture(scope="module")
def server(index_dir):
    with serve(index_dir, env={"ALIGNSEARCH_API_KEY": KEY, "ALIGNSEARCH_REQUEST_TIMEOUT_S": "300"},
               ready_timeout=600) as url:
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
