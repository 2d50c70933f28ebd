"""A live server follows its index: ``index delete`` and ``index add`` are served within seconds, without a
restart; a deleted image is 404 and its captions leave the image-search answers."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import N_IMAGES
from alignsearch.indexer.index import Index
from alignsearch.service.launch import serve
from alignsearch.cli import main

pytestmark = pytest.mark.slow  # each test starts its own server, which loads the model


@pytest.fixture()
def index_copy(built, tmp_path) -> Path:
    out = tmp_path / "index"
    shutil.copytree(built, out)
    return out


def _wait_for(check, seconds: float = 15.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"not seen within {seconds} s")


def _images(url: str) -> int:
    return httpx.get(url + "/readyz", timeout=10).json()["images"]


def _captioned_image(index_dir: Path) -> tuple[str, Path, str]:
    index = Index(index_dir)
    image_id, caption = index.conn.execute(
        "SELECT image_id, text FROM captions WHERE image_id IS NOT NULL ORDER BY row LIMIT 1").fetchone()
    return image_id, index.images_root / image_id, caption


def _caption_images(url: str, photo: Path) -> list[str | None]:
    response = httpx.post(url + "/search/image", files={"file": ("p.jpg", photo.read_bytes())},
                          data={"k": "20", "candidates": "100"}, timeout=60)
    assert response.status_code == 200, response.text[:300]
    return [r["image_id"] for r in response.json()["results"]]


class Searching(threading.Thread):
    """Searches without a pause until stopped, keeping every status: swaps must never show through."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.statuses, self.stop = url, [], threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set() and len(self.statuses) < 2000:
                body = {"query": "a dog runs on the grass", "k": 5, "candidates": 16}
                self.statuses.append(client.post("/search/text", json=body).status_code)


def test_a_live_server_sees_a_delete_and_an_add_within_seconds(index_copy, photos, tmp_path):
    image_id, photo, caption = _captioned_image(index_copy)
    with serve(index_copy, env={"ALIGNSEARCH_RELOAD_INTERVAL_S": "0.5"}) as url:
        searching = Searching(url)
        searching.start()
        assert _images(url) == N_IMAGES
        assert httpx.get(f"{url}/images/{image_id}").status_code == 200
        assert image_id in _caption_images(url, photo)

        assert main(["index", "delete", str(index_copy), "--ids", image_id]) == 0
        started = time.monotonic()
        _wait_for(lambda: _images(url) == N_IMAGES - 1)
        seen_in = time.monotonic() - started
        assert httpx.get(f"{url}/images/{image_id}").status_code == 404
        assert image_id not in _caption_images(url, photo)  # its captions are still indexed, but filtered

        extra = tmp_path / "more"
        extra.mkdir()
        shutil.copy(photo, extra / "late.jpg")
        captions = tmp_path / "late.jsonl"
        captions.write_text(json.dumps({"image": "late.jpg", "caption": "a picture added later"}) + "\n")
        assert main(["index", "add", str(index_copy), "--images", str(extra), "--captions", str(captions),
                     "--quiet"]) == 0
        _wait_for(lambda: _images(url) == N_IMAGES)
        assert httpx.get(f"{url}/images/late.jpg").status_code == 200
        found = httpx.post(url + "/search/text", json={"query": caption, "k": 3}, timeout=60).json()["results"]
        assert "late.jpg" in [r["id"] for r in found]  # the same photo, back under its new id
        metrics = httpx.get(url + "/metrics").text
        assert "alignsearch_index_reloads_total 2.0" in metrics
        searching.stop.set()
        searching.join(60)
    assert seen_in < 5
    assert len(searching.statuses) > 10 and set(searching.statuses) == {200}  # no request saw a half state


def test_without_the_watcher_an_admin_reload_swaps(index_copy):
    image_id, _, _ = _captioned_image(index_copy)
    with serve(index_copy, env={"ALIGNSEARCH_RELOAD_INTERVAL_S": "0", "ALIGNSEARCH_API_KEY": "k"}) as url:
        auth = {"Authorization": "Bearer k"}
        assert httpx.post(url + "/admin/reload").status_code == 401
        assert main(["index", "delete", str(index_copy), "--ids", image_id]) == 0
        time.sleep(1.0)
        assert httpx.get(f"{url}/images/{image_id}", headers=auth).status_code == 200  # not followed on its own
        answer = httpx.post(url + "/admin/reload", headers=auth, timeout=60).json()
        assert answer["swapped"] is True and answer["images"] == N_IMAGES - 1 and answer["error"] is None
        assert httpx.get(f"{url}/images/{image_id}", headers=auth).status_code == 404
        assert httpx.post(url + "/admin/reload", headers=auth, timeout=60).json()["swapped"] is False
