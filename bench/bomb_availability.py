"""Image search availability while decode bombs arrive: ``python -m alignsearch.bench.bomb_availability --index DIR``.

Starts ``alignsearch serve`` on 127.0.0.1, then for ``--duration`` seconds sends ``--rate`` scan-bomb uploads a
second (:func:`bench.bombs.scan_bomb`: a 6000 x 6000 progressive JPEG with one scan repeated 20,000 times, 1.4
MB; ``--slow`` sends bombs under the scan limit instead, 3000 x 3000 with 95 scans, that reach a decode
process) while one client sends ordinary image searches back to back. Writes JSON: the share of ordinary
searches answered 200 within 1 s (the target is >= 95%), their latency percentiles, and how the bombs were
answered. The same ordinary searches are first timed for ``--duration`` seconds with no bombs (``baseline``),
so the effect of the bombs is a ratio within one run; the load average is recorded around both. The server's
decode metrics at the end (processes killed at their time limit, the longest a killed decode outlived it) come
with the report. ``--quick``: 15 s each.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from alignsearch.bench.bombs import scan_bomb
from alignsearch.service.launch import serve

RESULTS = Path(__file__).resolve().parent / "results"


def _photo() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _post(client: httpx.Client, data: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        status = client.post("/search/image", files={"file": ("x.jpg", data, "image/jpeg")}, data={"k": "5"}).status_code
    except httpx.HTTPError:
        status = 0
    return status, time.perf_counter() - started


def measure(url: str, duration: float, rate: float, bomb: bytes) -> dict:
    photo, stop = _photo(), threading.Event()
    normal: list[tuple[int, float]] = []
    bombs: list[tuple[int, float]] = []

    def ordinary() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                normal.append(_post(client, photo))

    with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as bomber, \
            ThreadPoolExecutor(64) as pool:
        worker = threading.Thread(target=ordinary)
        worker.start()
        started, sent, futures = time.perf_counter(), 0, []
        while (elapsed := time.perf_counter() - started) < duration:
            while rate > 0 and sent < elapsed * rate:
                futures.append(pool.submit(_post, bomber, bomb))
                sent += 1
            time.sleep(0.01)
        stop.set()
        worker.join()
        bombs = [f.result() for f in futures]
    ok = [t for s, t in normal if s == 200]
    latencies = np.array([t for _, t in normal]) if normal else np.zeros(1)
    return {
        "ordinary": {"requests": len(normal), "status": dict(Counter(s for s, _ in normal)),
                     "ok_within_1s": round(sum(t <= 1.0 for t in ok) / max(len(normal), 1), 4),
                     "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
                     "p95_ms": round(float(np.percentile(latencies, 95)) * 1000, 1),
                     "max_ms": round(float(latencies.max()) * 1000, 1)},
        "load_average_1m": os.getloadavg()[0],
        "bombs": {"sent": len(bombs), "status": dict(Counter(s for s, _ in bombs)),
                  "p50_ms": round(float(np.percentile([t for _, t in bombs] or [0], 50)) * 1000, 1),
                  "max_ms": round(max([t for _, t in bombs] or [0]) * 1000, 1)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m alignsearch.bench.bomb_availability", description=__doc__)
    p.add_argument("--index", type=Path, required=True, help="an index folder to serve")
    p.add_argument("--duration", type=float, default=None, help="seconds of bombs, and of the baseline before them "
                   "(default 60; 15 with --quick)")
    p.add_argument("--quick", action="store_true", help="15 s of baseline and 15 s of bombs")
    p.add_argument("--rate", type=float, default=8.0, help="bomb uploads per second (default 8)")
    p.add_argument("--slow", action="store_true", help="bombs under the scan limit that reach a decode process")
    p.add_argument("--out", type=Path, default=RESULTS / "bomb-availability.json", help="where to write the JSON")
    args = p.parse_args(argv)
    bomb = scan_bomb(3000, 85) if args.slow else scan_bomb(6000, 20_000)
    env = {"ALIGNSEARCH_MAX_WORK": "20000"}
    if args.slow:  # let the bombs through the work bound so that they reach a process and its time limit
        env["ALIGNSEARCH_MAX_DECODE_WORK"] = str(10**12)
    args.duration = args.duration or (15.0 if args.quick else 60.0)
    try:
        # room for the bomb and for the ordinary photo (a small slow bomb's 4x would refuse the photo with 413)
        limit = 4 * max(len(bomb), len(_photo()))
        with serve(args.index, "--max-upload-bytes", str(limit), env=env, ready_timeout=900) as url:
            with httpx.Client(base_url=url, timeout=120) as client:  # warm up: a decode process, the encoder
                _post(client, _photo())
            load_before = os.getloadavg()[0]
            baseline = measure(url, args.duration, 0, bomb)
            report = measure(url, args.duration, args.rate, bomb)
            metrics = httpx.get(url + "/metrics", timeout=30).text
    except (OSError, RuntimeError, httpx.HTTPError) as exc:
        print(f"bench.bomb_availability: error: {exc}", file=sys.stderr)
        return 2
    decode = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith(("alignsearch_decode_processes_killed ", "alignsearch_decode_kill_overrun"))}
    report = {"duration_s": args.duration, "rate_per_s": args.rate, "bomb_bytes": len(bomb),
              "bomb": "slow (under the scan limit)" if args.slow else "20,000 scans",
              "load_average_1m_before": load_before, "cpu_count": os.cpu_count(),
              "baseline": {"ordinary": baseline["ordinary"], "load_average_1m": baseline["load_average_1m"]},
              **report, "decode_metrics": decode}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
