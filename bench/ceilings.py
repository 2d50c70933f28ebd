"""Ceilings of the pipeline around the encoders, each a ratio measured in one run.

``python -m alignsearch.bench.ceilings [--quick] [--parts server rerank] [--out FILE]``

- **server**: ``POST /search/text`` throughput of the real server (``alignsearch serve``'s own worker, every
  middleware, admission, batching, FAISS, rerank, SQLite, JSON) with the text encoder replaced by an instant
  stand-in (:func:`instant_encoders`: a lookup of the benchmark's queries encoded once at start-up, same shapes,
  no compute), against a bare FastAPI/uvicorn endpoint (:func:`bare_app`) answering the same request with a
  response of the same bytes. The same client (:func:`load`: keep-alive HTTP/1.1 connections, written on
  asyncio streams so that the client costs the server's cores as little as possible), the same concurrency,
  the phases in turns; and the real server again with ``--workers N`` processes.
- **rerank**: the batched rerank of 16 queries x 100 candidates against a copy of the same bytes
  (:func:`bench.suite.rerank_bandwidth`) for each kernel of :mod:`indexer.kernels`, and for the kernel the
  searcher chose at start-up by measuring.

The index is synthetic (:mod:`bench.synthetic`: 49 regions per photo, SQfp16). Every phase records the load
average before and after it: on a machine that is busy with other work the ratios move with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response  # at module level: the routes' annotations are resolved here

from . import pagecache

CONCURRENCY = 16
SUBMITTED_QUERIES = 16  # the suite's micro-batch of queries (bench.suite.BATCH_QUERIES), sent in turns


# -- the servers (each runs in a process of its own, started by ``--serve``) -------------------------------------

class InstantTexts:
    """A stand-in for ``AlignModel.encode_texts``: the encodings of known texts, looked up (no compute); an unknown
    text gets the first one's. Same shapes and types as the model's own output."""

    def __init__(self, model: Any, texts: list[str]) -> None:
        enc = model.encode_texts(texts)
        self.enc = enc
        self.position = {t: i for i, t in enumerate(texts)}

    def __call__(self, texts: list[str], batch_size: int = 64) -> Any:
        return self.enc.select([self.position.get(t, 0) for t in texts])


def instant_encoders(searcher: Any) -> None:
    """Swap the searcher's text encoder for :class:`InstantTexts` of the suite's queries (a ``prepare`` hook of
    :func:`service.serve.serve_worker`). With ``$ALIGNSEARCH_BENCH_PROFILE`` set to a folder, the worker's
    event loop thread and its light compute thread are profiled (cProfile), written there when it stops."""
    from .suite import BATCH_QUERIES

    searcher.model.encode_texts = InstantTexts(searcher.model, BATCH_QUERIES)
    folder = os.environ.get("ALIGNSEARCH_BENCH_PROFILE")
    if folder:
        _profile(Path(folder))


def _profile(folder: Path) -> None:
    """Profile this worker's event loop thread and light compute thread; written on SIGUSR1 (the benchmark
    sends it before it stops the server: uvicorn ends a worker by its stop signal, past any exit hook)."""
    import cProfile
    import signal

    from alignsearch.service.compute import compute_threads

    loop, light = cProfile.Profile(), cProfile.Profile()
    loop.enable()  # this is the thread that runs uvicorn's event loop next
    compute_threads().light.run(light.enable)
    folder.mkdir(parents=True, exist_ok=True)

    def dump(*_: Any) -> None:
        loop.disable()
        loop.dump_stats(folder / f"loop-{os.getpid()}.prof")
        compute_threads().light.submit(light.disable).result(timeout=30)
        light.dump_stats(folder / f"light-{os.getpid()}.prof")

    signal.signal(signal.SIGUSR1, dump)


def bare_app(body: bytes) -> Any:
    """A FastAPI app whose ``POST /search/text`` reads the request and answers ``body`` (JSON), nothing else."""
    app = FastAPI()

    @app.post("/search/text")
    async def search_text(request: Request) -> Response:
        await request.body()
        return Response(body, media_type="application/json")

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


def bare_worker(sock: Any, announce: Any, body: bytes) -> None:
    from alignsearch.service.serve import run_app

    announce(None)
    run_app(bare_app(body), sock, "warning")


def _serve(args: argparse.Namespace) -> int:
    """``--serve KIND``: one server on 127.0.0.1:``--port`` (run by :func:`_start`)."""
    from alignsearch.service.serve import bind, serve_worker
    from alignsearch.service.settings import Settings
    from alignsearch.service.workers import run_workers, worker_settings

    from . import ceilings  # the functions by their module's name (this one runs as __main__), for the workers

    sock = bind("127.0.0.1", args.port)
    if args.serve == "bare":
        return run_workers(sock, 1, ceilings.bare_worker, (Path(args.body).read_bytes(),))
    settings = worker_settings(Settings(index=args.index, device="cpu", reload_interval_s=0), args.workers)
    return run_workers(sock, args.workers, serve_worker, (settings, "warning", ceilings.instant_encoders))


class Server:
    """A server process of :func:`_serve` and its URL; stopped by :meth:`stop`."""

    def __init__(self, kind: str, *extra: str, ready_timeout: float = 900.0) -> None:
        from alignsearch.service.launch import free_port

        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "alignsearch.bench.ceilings", "--serve", kind,
                                      "--port", str(self.port), *extra], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{kind} server exited: {self.log.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{kind} server not ready in {ready_timeout:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.kind == "instant" and os.environ.get("ALIGNSEARCH_BENCH_PROFILE"):  # profiles first (_profile)
            for pid in pagecache.children(self.proc.pid):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():  # a worker, not the resource tracker
                    os.kill(pid, signal.SIGUSR1)
            time.sleep(5)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# -- the client ---------------------------------------------------------------------------------------------------

def _request(port: int, query: str) -> bytes:
    body = json.dumps({"query": query, "k": 10, "candidates": 100}).encode()
    return (f"POST /search/text HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


async def _connection(port: int, requests: list[bytes], until: float, latencies: list[float],
                      counts: dict[str, int], offset: int) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        counts["errors"] += 1
        return
    i = offset
    try:
        while time.perf_counter() < until:
            start = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (OSError, asyncio.IncompleteReadError):  # the server went away: counted, this connection ends
                counts["errors"] += 1
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            if head[9:12] == b"200":
                latencies.append((time.perf_counter() - start) * 1000.0)
                counts["bytes"] = len(body)
            else:
                counts["errors"] += 1
    finally:
        writer.close()


def load(port: int, queries: list[str], seconds: float, concurrency: int = CONCURRENCY) -> dict[str, Any]:
    """``concurrency`` keep-alive connections sending ``POST /search/text`` (``queries`` in turns) for
    ``seconds``: requests/s, p50 and p99 latency, errors (non-200 answers), response bytes."""
    requests = [_request(port, q) for q in queries]
    latencies: list[float] = []
    counts = {"errors": 0, "bytes": 0}

    async def run() -> float:
        until = time.perf_counter() + seconds
        start = time.perf_counter()
        await asyncio.gather(*(_connection(port, requests, until, latencies, counts, c) for c in range(concurrency)))
        return time.perf_counter() - start

    elapsed = asyncio.run(run())
    out: dict[str, Any] = {"requests": len(latencies), "errors": counts["errors"], "seconds": round(elapsed, 2),
                           "throughput_rps": round(len(latencies) / elapsed, 1), "response_bytes": counts["bytes"]}
    if latencies:
        ordered = sorted(latencies)
        out["p50_ms"] = round(statistics.median(ordered), 2)
        out["p99_ms"] = round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2)
    return out


# -- the measurements ------------------------------------------------------------------------------------------

def server_ceiling(index: Path, work: Path, seconds: float, rounds: int, workers: int,
                   concurrency: int = CONCURRENCY) -> dict[str, Any]:
    """The instant-encoder server (1 process, and ``workers`` processes) against the bare endpoint, in turns:
    each round runs every server for ``seconds`` after a short warm-up; ratios per round, and their median."""
    from .suite import BATCH_QUERIES

    queries = BATCH_QUERIES[:SUBMITTED_QUERIES]
    servers: dict[str, Server] = {}
    try:
        servers["instant"] = Server("instant", "--index", str(index), "--workers", "1")
        body = httpx.post(f"{servers['instant'].url}/search/text",
                          json={"query": queries[0], "k": 10, "candidates": 100}, timeout=60).content
        body_file = work / "bare-body.json"
        body_file.write_bytes(body)
        servers["bare"] = Server("bare", "--body", str(body_file))
        if workers > 1:
            servers[f"instant_{workers}_workers"] = Server("instant", "--index", str(index), "--workers", str(workers))
        phases: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        for _ in range(rounds):
            for name, server in servers.items():
                load(server.port, queries, min(1.0, seconds), concurrency)  # warm-up
                before = pagecache.load()
                figures = load(server.port, queries, seconds, concurrency)
                phases[name].append({**figures, "load_before": before, "load_after": pagecache.load()})
    finally:
        for server in servers.values():
            server.stop()
    out: dict[str, Any] = {"concurrency": concurrency, "seconds_per_phase": seconds, "rounds": rounds,
                           "bare_response_bytes": len(body), "phases": phases}
    for name in phases:
        if name == "bare":
            continue
        ratios = [p["throughput_rps"] / max(b["throughput_rps"], 1e-9) for p, b in zip(phases[name], phases["bare"])]
        out[f"{name}_over_bare_each_round"] = [round(r, 3) for r in ratios]
        out[f"{name}_over_bare"] = round(statistics.median(ratios), 3)
    if workers > 1:
        multi = [m["throughput_rps"] / max(s["throughput_rps"], 1e-9)
                 for m, s in zip(phases[f"instant_{workers}_workers"], phases["instant"])]
        out[f"{workers}_workers_over_1"] = round(statistics.median(multi), 3)
    return out


def rerank_ceiling(index: Path, model: Any, repeats: int, candidates: int = 100) -> dict[str, Any]:
    """16-query rerank against memcpy of the same bytes: each kernel, and the one chosen at start-up."""
    import torch

    from alignsearch.indexer import kernels
    from alignsearch.indexer.index import Index
    from alignsearch.indexer.search import Searcher

    from .suite import BATCH_QUERIES, rerank_bandwidth

    start = time.perf_counter()
    searcher = Searcher(Index(index), model)
    open_s = time.perf_counter() - start
    enc = model.encode_texts(BATCH_QUERIES)
    device = searcher.reranker.device
    out: dict[str, Any] = {"chosen": searcher.kernel_choice.kernel,
                           "start_up_timings_ms": searcher.kernel_choice.timings_ms,
                           "searcher_open_s": round(open_s, 2), "candidates": candidates,
                           "load_before": pagecache.load(), "kernels": {}}
    for name, (dtype, chunk) in kernels.candidates(device, "auto").items():
        reranker = kernels.reranker_for(device, dtype, chunk, "auto")
        out["kernels"][name] = rerank_bandwidth(searcher, enc, candidates, repeats, reranker=reranker)
    out["chosen_fraction_of_copy_bandwidth"] = out["kernels"][out["chosen"]]["fraction_of_copy_bandwidth"]
    out["float32_fraction_of_copy_bandwidth"] = out["kernels"]["float32"]["fraction_of_copy_bandwidth"]
    out["float16_fraction_of_copy_bandwidth"] = out["kernels"]["float16"]["fraction_of_copy_bandwidth"]
    fastest = max(out["kernels"], key=lambda k: out["kernels"][k]["fraction_of_copy_bandwidth"])
    out["fastest_here"] = fastest
    out["load_after"] = pagecache.load()
    out["torch_threads"] = torch.get_num_threads()
    return out


def rerank_bound(rerank: dict[str, Any], server: dict[str, Any]) -> dict[str, Any]:
    """What the rerank alone allows: requests/s if the server did nothing but the chosen kernel's rerank of each
    request's candidates (batched 16 queries at a time, on all the cores torch uses), against the bare endpoint.
    The served figure can come no nearer to the bare endpoint than this."""
    kernel = rerank["kernels"][rerank["chosen"]]
    per_query_ms = kernel["rerank_ms"] / kernel["queries"]
    bare = statistics.median(p["throughput_rps"] for p in server["phases"]["bare"])
    rps = 1000.0 / per_query_ms
    return {"rerank_ms_per_query": round(per_query_ms, 3), "requests_per_s": round(rps, 1),
            "over_bare": round(rps / max(bare, 1e-9), 3)}


def targets(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    server = results.get("server")
    if server:
        ratio = server["instant_over_bare"]
        out["served /search/text with instant encoders >= 50% of the bare endpoint"] = [ratio, ratio >= 0.5]
        errors = sum(p["errors"] for phases in server["phases"].values() for p in phases)
        out["zero errors"] = [errors, errors == 0]
    rerank = results.get("rerank")
    if rerank:
        fraction = rerank["chosen_fraction_of_copy_bandwidth"]
        out["16-query rerank >= 25% of memcpy in the kernel chosen"] = [fraction, fraction >= 0.25]
        out["the kernel chosen at start-up is the fastest here"] = [rerank["chosen"],
                                                                    rerank["chosen"] == rerank["fastest_here"]]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m alignsearch.bench.ceilings", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 2,000-photo index, 3 s phases, one round (about 2 min idle)")
    p.add_argument("--parts", nargs="+", choices=("server", "rerank"), default=["server", "rerank"])
    p.add_argument("--n", type=int, default=None, help="photos in the synthetic index (default 10000; quick 2000)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per phase (default 10; quick 3)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of phases in turns (default 3; quick 1)")
    p.add_argument("--workers", type=int, default=2, help="server processes of the multi-worker phase (1: none)")
    p.add_argument("--concurrency", type=int, default=CONCURRENCY)
    p.add_argument("--work", type=Path, default=None, help="scratch folder for the index (default: temp)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here (default: print it)")
    p.add_argument("--serve", choices=("instant", "bare"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--index", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--body", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        return _serve(args)

    import torch

    from alignsearch.models.factory import load_model

    from .synthetic import write_synthetic_index

    n = args.n or (2_000 if args.quick else 10_000)
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    rounds = args.rounds or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="alignsearch-ceilings-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = load_model(device="cpu")
        index = write_synthetic_index(work / f"synthetic-{n}", model, n)
        results: dict[str, Any] = {
            "environment": {"device": f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
                            "torch": torch.__version__, "threads": torch.get_num_threads(),
                            "load_at_start": pagecache.load()},
            "n": n, "command": "python -m alignsearch.bench.ceilings " + " ".join(sys.argv[1:] if argv is None else argv)}
        if "rerank" in args.parts:
            results["rerank"] = rerank_ceiling(index, model, repeats=5 if args.quick else 15)
            _write(args.out, results)  # a part's figures are kept even if a later part fails
        if "server" in args.parts:
            results["server"] = server_ceiling(index, work, seconds, rounds, args.workers, args.concurrency)
        if "rerank" in results and "server" in results:
            results["server"]["rerank_alone_bound"] = rerank_bound(results["rerank"], results["server"])
        results["targets"] = targets(results)
        results["environment"]["load_at_end"] = pagecache.load()
    print(_write(args.out, results))
    return 0


def _write(out: Path | None, results: dict[str, Any]) -> str:
    text = json.dumps(results, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
