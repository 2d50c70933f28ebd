"""Cheap queries under heavy load: does a plain text search stay fast while many clients send the most expensive
request the server accepts?

``python -m alignsearch.bench.isolation [--photos 300] [--clients 32] [--json FILE]`` builds an index of
``--photos`` photos (Flickr8k-800's when ``$ALIGNSEARCH_DATASET`` has them, synthetic otherwise) in a temporary
folder, starts ``alignsearch serve`` on 127.0.0.1 as a real subprocess, and measures one client's cheap query
(``POST /search/text``, a short sentence, ``k`` 10, the default candidates: the light lane) one request after
another: first alone (after a warm-up), then while ``--clients`` threads send, without pause, the most expensive
valid request: ``POST /search/image`` with a 1,000 x 1,000 JPEG as base64, ``k`` 100, ``candidates`` 200 (the
largest work admitted: 20,000) and ``explain`` (the heavy lane, an upload decode each). The heavy clients' answers
are counted by status (admission control answers some with 503 and ``Retry-After``: they are not retried early).

Reported (JSON): the cheap query's p50 / p90 alone and under load and their ratio (the target: p50 under load
<= 3x alone), heavy answers by status, and the load average before and during. Measure on an idle machine.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from .cli import DEFAULT_DATASET, emit_report
from .write_load import dataset_photos, synthetic_photo

KEY = "isolation-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHEAP = {"query": "a dog runs on the grass", "k": 10}
HEAVY_SIDE = 1000


def heavy_body(seed: int = 0) -> dict[str, Any]:
    """The most expensive valid image search: a 1-megapixel JPEG of noise (no cheap decode), k 100, 200
    candidates (candidates x k = 20,000, the admitted maximum), explain."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (HEAVY_SIDE, HEAVY_SIDE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return {"image_base64": base64.b64encode(buf.getvalue()).decode(), "k": 100, "candidates": 200, "explain": True}


def build_index(work: Path, photos: int, dataset: Path | None) -> Path:
    images = work / "images"
    images.mkdir(parents=True)
    sources = dataset_photos(dataset)
    rng = random.Random(7)
    for n in range(photos):
        image = sources[n % len(sources)][0] if sources else synthetic_photo(rng)[0]
        image.convert("RGB").save(images / f"p{n:04d}.jpg", quality=88)
    subprocess.run([sys.executable, "-m", "alignsearch", "index", "build", "--images", str(images),
                    "--out", str(work / "index"), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return work / "index"


def cheap_latencies(url: str, count: int) -> list[float]:
    out = []
    with httpx.Client(timeout=120) as client:
        for _ in range(count):
            start = time.perf_counter()
            r = client.post(f"{url}/search/text", headers=AUTH, json=CHEAP)
            r.raise_for_status()
            out.append((time.perf_counter() - start) * 1000)
    return out


def summary(values: list[float]) -> dict[str, float]:
    a = np.array(values)
    return {"count": len(values), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p90_ms": round(float(np.percentile(a, 90)), 1), "max_ms": round(float(a.max()), 1)}


def heavy_client(url: str, body: dict, stop: threading.Event, statuses: Counter, lock: threading.Lock) -> None:
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            try:
                r = client.post(f"{url}/search/image", headers=AUTH, json=body)
            except httpx.TransportError as exc:
                with lock:
                    statuses[type(exc).__name__] += 1
                continue
            with lock:
                statuses[str(r.status_code)] += 1
            if r.status_code == 503:  # as a well-behaved client does: wait what Retry-After says
                stop.wait(float(r.headers.get("retry-after", "1")))


def measure(folder: Path, clients: int, queries: int, warm_up_s: float, env: dict[str, str]) -> dict[str, Any]:
    """One server on ``folder``: the cheap query alone, then under the heavy clients."""
    from alignsearch.service.launch import start

    server = start(folder, env={"ALIGNSEARCH_API_KEY": KEY, **env}, ready_timeout=600)
    try:
        cheap_latencies(server.url, 5)  # warm-up
        load_before = os.getloadavg()[0]
        alone = cheap_latencies(server.url, queries)
        body, stop, statuses, lock = heavy_body(), threading.Event(), Counter(), threading.Lock()
        threads = [threading.Thread(target=heavy_client, args=(server.url, body, stop, statuses, lock), daemon=True)
                   for _ in range(clients)]
        for t in threads:
            t.start()
        time.sleep(warm_up_s)  # the heavy lane and the decoders busy
        loaded = cheap_latencies(server.url, queries)
        load_during = os.getloadavg()[0]
        stop.set()
        for t in threads:
            t.join(timeout=120)
    finally:
        server.stop()
    a, b = summary(alone), summary(loaded)
    return {"server_env": env, "cheap_alone": a, "cheap_under_load": b, "p50_ratio": round(b["p50_ms"] / a["p50_ms"], 2),
            "heavy_answers": dict(sorted(statuses.items())), "load_before": round(load_before, 2),
            "load_during": round(load_during, 2)}


def run(photos: int = 300, clients: int = 32, queries: int = 40, warm_up_s: float = 3.0,
        dataset: Path | None = DEFAULT_DATASET, heavy_nice: tuple[int | None, ...] = (None,)) -> dict[str, Any]:
    """The index once, then one server per ``heavy_nice`` value (None: the server's default)."""
    with tempfile.TemporaryDirectory(prefix="alignsearch-isolation-") as tmp:
        folder = build_index(Path(tmp), photos, dataset)
        runs = [measure(folder, clients, queries, warm_up_s,
                        {} if nice is None else {"ALIGNSEARCH_HEAVY_NICE": str(nice)}) for nice in heavy_nice]
    return {"photos": photos, "heavy_clients": clients, "cheap_request": CHEAP,
            "heavy_request": "POST /search/image, 1000x1000 JPEG (base64), k 100, candidates 200, explain",
            "target_p50_ratio": 3.0, "cpus": os.cpu_count(), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m alignsearch.bench.isolation", description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=300)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--queries", type=int, default=40, help="cheap queries measured alone and under load")
    p.add_argument("--heavy-nice", type=int, nargs="*", default=None,
                   help="run a server with each ALIGNSEARCH_HEAVY_NICE (default: one, with the server's default)")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    report = run(args.photos, args.clients, args.queries, heavy_nice=tuple(args.heavy_nice or (None,)))
    emit_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
