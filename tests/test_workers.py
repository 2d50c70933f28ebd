"""``alignsearch serve --workers N``: several processes on one port answer as one server would, with the
admission queues shared out between them; a worker that exits ends the server."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from alignsearch.bench.pagecache import children
from alignsearch.service.launch import serve
from alignsearch.service.serve import bind
from alignsearch.service.settings import Settings
from alignsearch.service.workers import POLL_S, run_workers, worker_settings


def test_each_worker_admits_its_share_of_the_queues():
    settings = Settings(max_queue=64, max_heavy_queue=4)
    assert (worker_settings(settings, 1).max_queue, worker_settings(settings, 1).max_heavy_queue) == (64, 4)
    two = worker_settings(settings, 2)
    assert (two.max_queue, two.max_heavy_queue) == (32, 2)
    three = worker_settings(settings, 3)  # rounded up, never 0
    assert (three.max_queue, three.max_heavy_queue) == (22, 2)
    assert worker_settings(settings, 8).max_heavy_queue == 1
    assert settings.max_queue == 64  # the server's own settings are not changed
    with pytest.raises(ValueError, match="workers"):
        worker_settings(settings, 0)


def exit_with(sock, announce, code: int) -> None:  # a worker that announces itself, serves a moment, then leaves
    announce({"code": code})
    time.sleep(10 * POLL_S)  # long enough for the parent's poll to see both announcements
    raise SystemExit(code)


def test_a_worker_that_exits_ends_the_server_with_its_status():
    sock = bind("127.0.0.1", 0)
    ready = []
    before = {p for p in children() if "spawn_main" in _cmdline(p)}  # other tests' pools may be alive
    try:
        assert run_workers(sock, 2, exit_with, (3,), on_ready=ready.append) == 3
    finally:
        sock.close()
    assert not {p for p in children() if "spawn_main" in _cmdline(p)} - before  # every worker was waited for
    assert ready == [[{"code": 3}, {"code": 3}]]


def serve_forever(sock, announce) -> None:  # a worker that announces itself and never leaves on its own
    announce({"pid": __import__("os").getpid()})
    while True:
        time.sleep(1)


# the parent of two serve_forever workers, in a process of its own (killed by the test)
PARENT = """
import sys, json
from alignsearch.service.serve import bind
from alignsearch.service.workers import run_workers
from test_workers import serve_forever
sock = bind("127.0.0.1", 0)
run_workers(sock, 2, serve_forever, (), on_ready=lambda infos: print(json.dumps(infos), flush=True))
"""


def test_workers_end_when_their_parent_is_killed():
    """SIGKILL (or the OOM killer) takes the parent without its clean-up: the workers, re-parented, stop by
    themselves instead of serving the port alone."""
    import json
    import os
    import signal
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=Path(__file__).parent, stdout=subprocess.PIPE,
                              text=True)
    try:
        workers = [info["pid"] for info in json.loads(parent.stdout.readline())]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "a worker outlived its parent"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow  # two workers each load the model
def test_two_workers_answer_as_the_searcher_does(built):
    from alignsearch.indexer.index import Index
    from alignsearch.indexer.search import Searcher

    index = Index(built)
    queries = [text for (text,) in index.conn.execute("SELECT text FROM captions ORDER BY row LIMIT 6")]
    searcher = Searcher.open(built, device="cpu")
    want = {q: [(h.id, h.score) for h in searcher.search_text([q], k=5, candidates=20)[0].hits] for q in queries}
    with serve(built, "--workers", "2", env={"ALIGNSEARCH_RELOAD_INTERVAL_S": "0"}, ready_timeout=900) as url:
        port = url.rsplit(":", 1)[1]
        server = next(p for p in children() if f" --port {port} " in _cmdline(p))
        workers = [p for p in children(server) if "spawn_main" in _cmdline(p)]  # each worker has its own decoders
        assert len(workers) == 2

        def ask(i: int) -> tuple[str, httpx.Response]:
            query = queries[i % len(queries)]
            with httpx.Client(base_url=url, timeout=120) as client:  # a new connection: any worker may take it
                return query, client.post("/search/text", json={"query": query, "k": 5, "candidates": 20})

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(24)))
        for query, response in answers:
            assert response.status_code == 200, response.text[:300]
            got = [(r["id"], r["score"]) for r in response.json()["results"]]
            assert [i for i, _ in got] == [i for i, _ in want[query]]
            assert [s for _, s in got] == pytest.approx([s for _, s in want[query]], abs=1e-4)
        assert httpx.get(url + "/readyz", timeout=10).json()["images"] == index.manifest["counts"]["images"]
