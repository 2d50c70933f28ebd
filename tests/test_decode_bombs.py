"""Decode bombs against a real server on 127.0.0.1: a JPEG with too many scans is refused from its markers, and
one that passes the limits but decodes too slowly has its decode process killed when its 503 is sent, so image
search stays available (a bounded run: a few bombs, seconds)."""

from __future__ import annotations

import io
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from alignsearch.bench.bombs import scan_bomb
from alignsearch.service.launch import serve

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(built):
    env = {"ALIGNSEARCH_MAX_PIXELS": "10000000", "ALIGNSEARCH_MAX_JPEG_SCANS": "1000",
           "ALIGNSEARCH_MAX_DECODE_WORK": str(10**12), "ALIGNSEARCH_DECODE_TIMEOUT_S": str(TIMEOUT_S),
           "ALIGNSEARCH_DECODE_WORKERS": "1"}
    with serve(built, "--max-upload-bytes", "4000000", env=env, ready_timeout=900) as url:
        yield url


def _children(port: int) -> set[int]:
    """The decode processes of the server listening on ``port`` (its children that multiprocessing spawned)."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            procs[int(entry.name)] = (cmd, ppid)
    servers = {pid for pid, (cmd, _) in procs.items() if b"serve" in cmd and str(port).encode() in cmd}
    return {pid for pid, (cmd, ppid) in procs.items()
            if ppid in servers and any(b"multiprocessing" in part for part in cmd)}


def _upload(server: str, data: bytes) -> httpx.Response:
    return httpx.post(server + "/search/image", files={"file": ("x.jpg", data, "image/jpeg")}, data={"k": "3"},
                      timeout=60)


def _eventually_ok(server: str, limit: float = 120) -> None:
    """An ordinary upload answered 200 (retried while a decode process starts: seconds on a loaded machine)."""
    deadline = time.monotonic() + limit
    while (status := _upload(server, _photo()).status_code) == 503 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status == 200


def _photo() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (30, 120, 200)).save(buf, format="JPEG", progressive=True)
    return buf.getvalue()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_scan_bombs_are_refused_or_killed_and_image_search_stays_up(server):
    port = urlsplit(server).port
    _eventually_ok(server)
    for _ in range(3):  # 20,000 scans: over the limit, refused from the markers before any decode
        started = time.perf_counter()
        response = _upload(server, scan_bomb(1000, 20_000))
        assert response.status_code == 413 and "scans" in response.json()["detail"]
        assert time.perf_counter() - started < 3
    before = _children(port)
    assert before, "the server runs its decodes in processes of its own"
    slow = scan_bomb(3000, 980)  # under the scan limit, seconds to decode: killed at the time limit
    for _ in range(2):
        started = time.perf_counter()
        response = _upload(server, slow)
        took = time.perf_counter() - started
        assert response.status_code == 503 and "longer than" in response.json()["detail"]
        assert response.headers["Retry-After"] == "1" and took < TIMEOUT_S + 3, took
    for _ in range(100):  # the killed processes are gone; a fresh one is started for the next upload
        if not before & _children(port):
            break
        time.sleep(0.1)
    assert not before & _children(port), "a decode process outlived its time limit"
    _eventually_ok(server)
    metrics = httpx.get(server + "/metrics", timeout=10).text
    killed = [line for line in metrics.splitlines() if line.startswith("alignsearch_decode_processes_killed ")]
    assert killed and float(killed[0].split()[1]) >= 2
