"""The benchmarks. Each returns a dict of figures; ratios are measured in the same run, medians over repeats."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from alignsearch.indexer.index import Index
from alignsearch.indexer.search import Searcher
from alignsearch.models.model import AlignModel, EncoderOutput
from alignsearch.models.scoring import ScoringConfig

from . import pagecache
from .synthetic import write_synthetic_index

QUERIES = ["a dog runs through the grass", "two children play football in a park", "a man rides a bike down a hill",
           "people walk along a busy street", "a girl in a pink dress climbs stairs", "a black dog swims in a lake",
           "a surfer rides a large wave", "a crowd watches a parade"]
BATCH_QUERIES = QUERIES + ["an old woman sells fruit at a market", "a boy jumps into a swimming pool",
                           "two dogs fight over a stick", "a skier goes down a snowy slope",
                           "a band plays on a stage at night", "a cat sleeps on a red sofa",
                           "a climber hangs from a rock face", "children run on a sandy beach"]  # one micro-batch


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    return paired_median_ms([fn], repeats, warmup)[0]


def paired_median_ms(fns: list[Callable[[], Any]], repeats: int, warmup: int = 1) -> list[float]:
    """Median ms of each of ``fns``, timed in turns (one call of each per round), so that a slow moment of the
    machine falls on all of them alike instead of on whichever ran then."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append((time.perf_counter() - start) * 1000.0)
    return [round(statistics.median(spent), 3) for spent in times]


def percentiles(times_ms: list[float]) -> dict[str, float]:
    """p50 and p99 of a list of timings (ms)."""
    values = np.array(times_ms)
    return {"p50_ms": round(float(np.percentile(values, 50)), 3), "p99_ms": round(float(np.percentile(values, 99)), 3),
            "count": len(values)}


def synthetic_queries(count: int, dim: int, words: int = 12, seed: int = 7) -> EncoderOutput:
    """Random encoded text queries shaped like real ones (``words`` tokens), for latency percentiles."""
    rng = np.random.default_rng(seed)
    local = rng.standard_normal((count, words, dim), dtype=np.float32)
    local /= np.linalg.norm(local, axis=-1, keepdims=True)
    glob = local.mean(1)
    glob /= np.linalg.norm(glob, axis=-1, keepdims=True)
    return EncoderOutput(torch.from_numpy(glob), torch.from_numpy(local), torch.ones(count, words, dtype=torch.bool))


def _exhaustive_scorer(index: Index, scoring: ScoringConfig, chunk: int = 2048):
    """TERAN-style exhaustive scoring: every item's regions held decoded in RAM (float16) with their masks,
    scored in chunks by the same scorer as the Searcher's rerank."""
    store = index.images.store
    n = len(store)
    regions = int(store.lengths().max())
    decoded = torch.zeros((n, regions, store.dim), dtype=torch.float16)
    masks = torch.zeros((n, regions), dtype=torch.bool)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        local, mask = store.gather(rows)
        decoded[start : start + len(rows), : local.shape[1]] = local.half()
        masks[start : start + len(rows), : mask.shape[1]] = mask
    global_vectors = torch.from_numpy(index.images.index.vectors(np.arange(n)))

    def score(enc) -> torch.Tensor:
        local = torch.cat([scoring.local(enc.local, enc.mask, decoded[start : start + chunk].float(),
                                         masks[start : start + chunk]) for start in range(0, n, chunk)], dim=1)
        return scoring.fuse(enc.global_emb @ global_vectors.T, local).topk(10, dim=1)

    return score


def _exhaustive_fits(n: int, regions: int, dim: int) -> bool:
    """The exhaustive baseline holds every region decoded (float16): only when that is < 40% of the memory
    available (``MemAvailable``: free plus reclaimable page cache)."""
    return n * regions * dim * 2 < 0.4 * pagecache.available_memory()


def rerank_bandwidth(searcher: Searcher, enc: EncoderOutput, candidates: int, repeats: int,
                     dtype: torch.dtype | None = None, reranker: Any = None) -> dict[str, Any]:
    """The batched rerank of ``enc``'s queries (gather of their candidates' union, decode, score) against a
    plain copy of the same bytes: GB/s of each and the fraction. By the searcher's reranker (the kernel it
    chose at start-up), a plain one computing in ``dtype``, or ``reranker``."""
    from alignsearch.indexer.rerank import Reranker

    col = searcher.index.images
    rows = searcher.coarse(enc.global_emb.numpy(), col, candidates)[0]
    if reranker is None:
        reranker = searcher.reranker if dtype is None else Reranker(searcher.reranker.device, dtype)
    nbytes = reranker.rerank(enc, col.store, rows, True, searcher.scoring).gathered.nbytes
    source = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    target = np.empty_like(source)
    rerank_ms, copy_ms = paired_median_ms([lambda: reranker.rerank(enc, col.store, rows, True, searcher.scoring),
                                           lambda: np.copyto(target, source)], repeats, warmup=2)  # in turns
    out = {"queries": len(enc), "dtype": str(reranker.dtype_for(len(enc), True)).replace("torch.", ""),
           "kernel": reranker.kernel, "rerank_ms": rerank_ms,
           "rerank_bytes": nbytes, "memcpy_ms": copy_ms, "rerank_gb_s": round(nbytes / rerank_ms / 1e6, 3),
           "memcpy_gb_s": round(nbytes / copy_ms / 1e6, 3)}
    out["fraction_of_copy_bandwidth"] = round(out["rerank_gb_s"] / out["memcpy_gb_s"], 4)
    if reranker.device.type == "cuda":
        out["gpu"] = _gpu_bandwidth(reranker, enc, col.store, rows, source, searcher.scoring, repeats)
    return out


def _synced(fn: Callable[[], Any]) -> Callable[[], None]:
    def call() -> None:
        fn()
        torch.cuda.synchronize()
    return call


def _gpu_bandwidth(reranker: Any, enc: EncoderOutput, store: Any, rows: list[np.ndarray], source: np.ndarray,
                   scoring: Any, repeats: int) -> dict[str, Any]:
    """Where a GPU rerank's time goes: the host-to-device copy of the gathered bytes (pageable, as the rerank
    does it, and pinned), and the scoring alone on tokens already on the GPU against a device-to-device copy of
    the same bytes (the GPU's memory limit)."""
    from alignsearch.indexer.rerank import gather

    union = np.unique(np.concatenate(rows))
    gathered = gather(store, union, reranker.device)
    queries, q_mask = reranker.queries_on_device(enc)
    host, on_device = torch.from_numpy(source), torch.empty(len(source), dtype=torch.uint8, device=reranker.device)
    pinned = host.pin_memory()
    score_bytes = gathered.tokens.numel() * torch.finfo(reranker.dtype).bits // 8
    big = torch.empty(score_bytes, dtype=torch.uint8, device=reranker.device)
    big_copy = torch.empty_like(big)
    ms = {
        "h2d_pageable_ms": median_ms(_synced(lambda: on_device.copy_(host)), repeats, warmup=2),
        "h2d_pinned_ms": median_ms(_synced(lambda: on_device.copy_(pinned, non_blocking=True)), repeats, warmup=2),
        "score_only_ms": median_ms(_synced(lambda: reranker.score_gathered(queries, q_mask, gathered, True, scoring)),
                                   repeats, warmup=2),
        "device_copy_ms": median_ms(_synced(lambda: big_copy.copy_(big)), repeats, warmup=2),
    }
    out: dict[str, Any] = {**ms, "gathered_bytes": len(source), "scored_bytes": score_bytes,
                           "h2d_pageable_gb_s": round(len(source) / ms["h2d_pageable_ms"] / 1e6, 2),
                           "h2d_pinned_gb_s": round(len(source) / ms["h2d_pinned_ms"] / 1e6, 2),
                           "score_gb_s": round(score_bytes / ms["score_only_ms"] / 1e6, 2),
                           "device_copy_gb_s": round(2 * score_bytes / ms["device_copy_ms"] / 1e6, 2)}
    out["score_fraction_of_device_copy"] = round(out["score_gb_s"] / out["device_copy_gb_s"], 4)
    out["how"] = ("score: the rerank's scoring alone on the gathered tokens already on the GPU, bytes read once; "
                  "device copy: read + write bytes of a copy of as many bytes")
    return out


def evict(index: Index, files: list[Path]) -> None:
    """Make ``files`` cold again: the index's memory maps cleared (:func:`pagecache.unmap`), then the files
    dropped from the page cache."""
    pagecache.unmap(col.store.codes for col in index.collections.values() if hasattr(col.store, "codes"))
    pagecache.drop(files)


def search_latency(searcher: Searcher, enc: EncoderOutput, candidates: int, cold_files: list[Path] | None
                   ) -> dict[str, Any]:
    """Per-query two-stage and global-only search latency (query encoded) over ``enc``'s queries; with
    ``cold_files``, those files are evicted from the page cache before every query (cold, :func:`evict`)."""
    col = searcher.index.images
    two, glob = [], []
    for q in range(len(enc)):
        one = enc.select([q])
        if cold_files:
            evict(searcher.index, cold_files)
        start = time.perf_counter()
        searcher.search_text_encoded(one, 10, candidates)
        two.append((time.perf_counter() - start) * 1000.0)
        start = time.perf_counter()
        col.search(one.global_emb.numpy(), 10)
        glob.append((time.perf_counter() - start) * 1000.0)
    return {"two_stage": percentiles(two), "global_only": percentiles(glob)}


def server_rss(index_dir: Path, requests: int = 32) -> dict[str, Any]:
    """Resident memory of a real server (``alignsearch serve``) on ``index_dir`` after ``requests`` searches; with
    how long it took to start on the index's files dropped from the page cache (a restart on a cold cache: process
    start, model and index load, until ``/readyz`` answers) and its first search's time over HTTP (cold pages)
    against the median of the others."""
    import httpx

    from alignsearch.service.launch import serve

    pagecache.drop(pagecache.files_under(index_dir))
    start = time.perf_counter()
    with serve(index_dir, device=None, env={"ALIGNSEARCH_RELOAD_INTERVAL_S": "0"}, ready_timeout=3600) as url, \
            httpx.Client(base_url=url, timeout=120) as client:  # one client: not a connection per request
        ready_s = time.perf_counter() - start
        times = []
        for i in range(requests):
            start = time.perf_counter()
            client.post("/search/text", json={"query": QUERIES[i % len(QUERIES)], "k": 10, "candidates": 100}
                        ).raise_for_status()
            times.append((time.perf_counter() - start) * 1000.0)
        pids = pagecache.children()
        rss = {pid: pagecache.rss_bytes(pid) for pid in pids}
    pid = max(rss, key=lambda p: rss[p].get("VmRSS", 0))
    return {"requests": requests, "cold_start_ready_s": round(ready_s, 2), "first_request_ms": round(times[0], 1),
            "other_requests_p50_ms": round(statistics.median(times[1:]), 1) if requests > 1 else None,
            **{k.lower(): v for k, v in rss[pid].items()}}


def speed_vs_exhaustive_and_global(model: AlignModel, sizes: list[int], work: Path, repeats: int,
                                   candidates: int = 100, codec: str = "SQfp16", global_spec: str | None = "Flat",
                                   latency_queries: int = 0, server: bool = False) -> dict[str, Any]:
    """Benchmarks 1, 2 and 4 on synthetic indexes of each size, warm, after cold figures (labelled ``cold``).

    Each index is flushed to disk and dropped from the page cache once written (:mod:`bench.pagecache`), so
    the first timing is of a cold cache, on purpose and recorded as such; warm timings follow a warm-up.
    ``latency_queries`` > 0 adds p50 / p99 over that many random queries, cold (the index's files dropped
    before each) and warm; ``server`` adds the RSS of a real server on the index."""
    out: dict[str, Any] = {}
    enc_one = model.encode_texts(QUERIES[:1])
    enc_batch = model.encode_texts(BATCH_QUERIES)
    for n in sizes:
        name = f"synthetic-{n}" + ("" if codec == "SQfp16" and global_spec == "Flat" else f"-{codec}-{global_spec or 'chosen'}")
        start = time.perf_counter()
        folder = write_synthetic_index(work / name, model, n, codec=codec, global_spec=global_spec)
        write_s = round(time.perf_counter() - start, 1)
        files = pagecache.files_under(folder)
        pagecache.drop(files)  # flush what was written; nothing of it stays cached
        index = Index(folder, check="size")
        searcher = Searcher(index, model)
        store_files = pagecache.files_under(folder / "images")
        row: dict[str, Any] = {
            "n": n, "regions": 49, "dim": model.embed_dim, "candidates": candidates, "codec": codec,
            "global_factory": index.manifest["collections"]["images"].get("factory"), "write_s": write_s,
            "index_bytes": {p.relative_to(folder).as_posix(): p.stat().st_size for p in files
                            if p.stat().st_size > 1 << 20},
            "load_before": pagecache.load()}
        # cold: each of the queries right after the index's files were dropped from the page cache (median)
        cold = search_latency(searcher, enc_batch.select(range(len(QUERIES))), candidates, store_files)
        row["cold"] = {"two_stage_search_ms": cold["two_stage"]["p50_ms"],
                       "how": "the index's maps cleared and its files dropped (posix_fadvise DONTNEED) "
                              "before each of 8 queries"}
        for _ in range(3):  # warm-up
            searcher.search_text_encoded(enc_batch, 10, candidates)
        # 1. two-stage vs exhaustive (query already encoded: the search itself)
        row["two_stage_search_ms"] = median_ms(lambda: searcher.search_text_encoded(enc_one, 10, candidates), repeats)
        if _exhaustive_fits(n, 49, model.embed_dim):
            score = _exhaustive_scorer(index, searcher.scoring)
            row["exhaustive_search_ms"] = median_ms(lambda: score(enc_one), max(3, repeats // 5))
            row["speedup_two_stage_vs_exhaustive"] = round(row["exhaustive_search_ms"] / row["two_stage_search_ms"], 1)
            score = None  # frees the decoded collection before the next size
        else:
            row["exhaustive_search_ms"] = None
            row["speedup_two_stage_vs_exhaustive"] = None
            row["exhaustive_skipped"] = "every region decoded would not fit in memory"
        # 2. end to end with encoding: global-only vs two-stage, timed in turns
        query = QUERIES[0]

        def global_only() -> None:
            enc = model.encode_texts([query])
            index.images.index.search(enc.global_emb.numpy(), 10)

        row["global_only_e2e_ms"], row["two_stage_e2e_ms"] = paired_median_ms(
            [global_only, lambda: searcher.search_text([query], 10, candidates)], repeats)
        row["two_stage_over_global_only"] = round(row["two_stage_e2e_ms"] / row["global_only_e2e_ms"], 3)
        # 4. rerank bandwidth against a plain copy of the same bytes: one query, and a micro-batch
        row["rerank"] = {"1": rerank_bandwidth(searcher, enc_one, candidates, repeats),
                         str(len(enc_batch)): rerank_bandwidth(searcher, enc_batch, candidates, repeats)}
        if searcher.reranker.device.type == "cpu":  # what the other precisions would do here
            for dtype in (d for d in (torch.float32, torch.float16, torch.bfloat16) if d != searcher.reranker.dtype):
                row["rerank"][f"{len(enc_batch)}-{dtype}".replace("torch.", "")] = rerank_bandwidth(
                    searcher, enc_batch, candidates, max(3, repeats // 3), dtype)
        if latency_queries:
            queries = synthetic_queries(latency_queries, model.embed_dim)
            row["latency_cold"] = {**search_latency(searcher, queries, candidates, store_files),
                                   "how": "the index's maps cleared and the local store and global index dropped "
                                          "(posix_fadvise DONTNEED) before each query"}
            search_latency(searcher, queries, candidates, None)  # warms the queries' pages
            row["latency_warm"] = search_latency(searcher, queries, candidates, None)
            row["latency_warm"]["two_stage_over_global_only_p50"] = round(
                row["latency_warm"]["two_stage"]["p50_ms"] / row["latency_warm"]["global_only"]["p50_ms"], 3)
        row["load_after"] = pagecache.load()
        if server:
            row["server"] = server_rss(folder)
            row["server"]["load_after"] = pagecache.load()
        out[str(n)] = row
    return out


def quality_and_codecs(model: AlignModel, dataset: Path, codecs: list[str], limit: int | None,
                       candidates: int = 20) -> dict[str, Any]:
    """Benchmarks 3 and 6: the three modes on the test split, per local codec, with bytes per item and the
    speed of gathering and decoding ``candidates`` photos' region vectors (:func:`decode_speed`)."""
    from alignsearch.indexer.evaluate import evaluate_split

    out = {}
    for codec in codecs:
        report = evaluate_split(model, dataset / "dataset_flickr8k.json", dataset / "images", "test", candidates,
                                progress=False, local_codec=codec, limit=limit)
        out[codec] = {"results": report["results"], "images": report["images"], "captions": report["captions"],
                      "bytes_per_image_local": report["bytes_per_item"]["images"]["local"],
                      "bytes_per_caption_local": report["bytes_per_item"]["captions"]["local"],
                      **decode_speed(codec, model.embed_dim, candidates)}
    return out


def decode_speed(codec: str, dim: int, candidates: int = 20, photos: int = 1_000, regions: int = 49,
                 repeats: int = 51) -> dict[str, float]:
    """Median time to gather and decode ``candidates`` random photos' region vectors (what one query's rerank
    reads) from a store of ``photos`` unit vectors in the images' codec of ``codec``, trained on 4,096 of them;
    with the decoded float32 rate in million vectors per second."""
    import tempfile

    from alignsearch.indexer.stores import local_backend

    backend = local_backend()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((photos * regions, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    coder = backend.make_codec(dim, backend.spec_for(codec, "images"), vectors[:4_096])
    with tempfile.TemporaryDirectory(prefix="alignsearch-decode-") as tmp:
        backend.write(Path(tmp), coder, [vectors], np.full(photos, regions))
        store = backend.open(Path(tmp))
        picks = [rng.choice(photos, candidates, replace=False) for _ in range(repeats + 1)]
        calls = iter(picks)
        ms = median_ms(lambda: store.gather(next(calls)), repeats)
    return {"gather_ms": ms, "decode_mvectors_per_s": round(candidates * regions / ms / 1e3, 2)}


def build_throughput(model: AlignModel, images: Path, limit: int | None, work: Path, rounds: int = 3,
                     workers: int | None = None) -> dict[str, Any]:
    """Benchmark 5: images/s of ``index build`` (decoding in worker processes) against the encoder's forward
    pass alone on pre-decoded images. ``rounds`` builds, each between two forward-only timings (each after a
    warm-up, with the load average around it): a round's ratio sets its build against the forward passes just
    before and after it, and the median round is reported, since this machine's own speed drifts between runs.
    ``workers``: decode processes (default 4 on a CPU, all cores but two on a GPU)."""
    from alignsearch.indexer.allocator import keep_freed_memory
    from alignsearch.indexer.build import BuildOptions, build
    from alignsearch.indexer.reader import list_images
    from alignsearch.models.preprocess import load_image

    files = list_images(images)[:limit]
    allocator_tuned = keep_freed_memory()  # as `alignsearch index` does (indexer/allocator.py)
    on_gpu = model.device.type == "cuda"
    if workers is None:
        workers = max(4, (os.cpu_count() or 4) - 2) if on_gpu else 4  # on a GPU, decoding is what limits
    batch = 128 if on_gpu else 32
    pixels = torch.stack([model.preprocess_images([load_image(images / f)])[0] for f in files])
    loads: dict[str, list[float]] = {}

    def forward() -> float:
        model.encode_pixels(pixels[:batch])  # warm-up
        loads.setdefault("forward_before", pagecache.load())
        start = time.perf_counter()
        for i in range(0, len(files), batch):
            model.encode_pixels(pixels[i : i + batch])
        if on_gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        loads["forward_after"] = pagecache.load()
        return seconds

    build(model, BuildOptions(images=images, out=work / "build-warmup", files=files[:batch], progress=False,
                              batch_size=batch, workers=workers))  # warm-up: the decode processes' imports
    forward_s, build_s = [forward()], []
    for r in range(max(1, rounds)):
        options = BuildOptions(images=images, out=work / f"build-bench-{r}", files=files, progress=False,
                               batch_size=batch, workers=workers)
        loads.setdefault("build_before", pagecache.load())
        start = time.perf_counter()
        build(model, options)
        build_s.append(time.perf_counter() - start)
        loads["build_after"] = pagecache.load()
        forward_s.append(forward())
    ratios = [statistics.mean(forward_s[r : r + 2]) / b for r, b in enumerate(build_s)]
    median = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]
    forward_mean = statistics.mean(forward_s[median : median + 2])
    return {"images": len(files), "rounds": len(build_s), "build_seconds": round(build_s[median], 2),
            "build_images_per_s": round(len(files) / build_s[median], 1),
            "forward_only_images_per_s": round(len(files) / forward_mean, 1),
            "forward_only_images_per_s_before_after": [round(len(files) / s, 1) for s in forward_s],
            "build_images_per_s_each_round": [round(len(files) / s, 1) for s in build_s],
            "build_fraction_of_forward_each_round": [round(x, 3) for x in ratios],
            "build_fraction_of_forward": round(ratios[median], 3), "decode": "worker processes",
            "decode_workers": workers, "batch_size": batch, "malloc_tuned": allocator_tuned, "load": loads}


PHONE_PHOTO = (4032, 3024)  # 12 megapixels: what most phones write


def phone_photos(images: Path, count: int, out: Path, quality: int = 90) -> Path:
    """The first ``count`` photos of ``images`` scaled up to phone size (:data:`PHONE_PHOTO`, portrait ones
    turned) and saved as JPEG at ``quality`` in ``out``: the pixel count and file size of a user's photos."""
    from PIL import Image

    from alignsearch.indexer.reader import list_images

    out.mkdir(parents=True, exist_ok=True)
    for rel in list_images(images)[:count]:
        target = out / Path(rel).with_suffix(".jpg").name
        if not target.exists():
            with Image.open(images / rel) as image:
                size = PHONE_PHOTO if image.width >= image.height else PHONE_PHOTO[::-1]
                image.convert("RGB").resize(size, Image.BICUBIC).save(target, quality=quality)
    return out


def phone_photo_build(model: AlignModel, images: Path, count: int, work: Path, rounds: int = 3) -> dict[str, Any]:
    """Benchmark 5b: the build on photos of a phone's size (:func:`phone_photos`): CPU ms per photo (one thread,
    process time) to decode and resize one at full size and at the build's reduced JPEG scale
    (:meth:`ImagePreprocessor.load_file`), and :func:`build_throughput` on them."""
    from alignsearch.indexer.reader import list_images
    from alignsearch.models.preprocess import load_image

    folder = phone_photos(images, count, work / "phone-photos")
    pre = model.image_preprocessor
    paths = [folder / f for f in list_images(folder)]
    costs = {}
    for label, read in (("full", lambda p: pre.resize(load_image(p))), ("build", lambda p: pre.load_file(p)[0])):
        read(paths[0])  # warm-up
        start = time.process_time()
        for path in paths:
            read(path)
        costs[label] = round((time.process_time() - start) * 1e3 / len(paths), 1)
    return {"photo_pixels": "x".join(map(str, PHONE_PHOTO)),
            "megabytes_per_photo": round(sum(p.stat().st_size for p in paths) / len(paths) / 1e6, 2),
            "decode_cpu_ms_per_photo_full": costs["full"], "decode_cpu_ms_per_photo_build": costs["build"],
            **build_throughput(model, folder, None, work / "phone-build", rounds=rounds)}


def serving(index_dir: Path, requests_total: int, concurrency: int = 16) -> dict[str, Any]:
    """Benchmark 7: a real server on 127.0.0.1; throughput, p50, p99 with micro-batching on and off."""

    from alignsearch.service.client import AsyncAlignSearchClient
    from alignsearch.service.launch import serve

    out = {}
    for label, max_batch in (("batching_on", 16), ("batching_off", 1)):
        with serve(index_dir, "--max-batch", str(max_batch), device=None, env={"ALIGNSEARCH_RELOAD_INTERVAL_S": "0"}) as url:
            latencies: list[float] = []
            errors = 0

            async def run() -> float:
                nonlocal errors
                counter = iter(range(requests_total))
                async with AsyncAlignSearchClient(url, timeout=60) as client:
                    async def worker() -> None:
                        nonlocal errors
                        for i in counter:
                            start = time.perf_counter()
                            try:
                                await client.search_text(QUERIES[i % len(QUERIES)], k=10, candidates=100)
                                latencies.append((time.perf_counter() - start) * 1000.0)
                            except Exception:  # noqa: BLE001  (counted)
                                errors += 1

                    await client.search_text(QUERIES[0])  # warm-up
                    loads.append(pagecache.load())
                    start = time.perf_counter()
                    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 300)
                    return time.perf_counter() - start

            loads: list[list[float]] = []
            seconds = asyncio.run(run())
            loads.append(pagecache.load())
            out[label] = {"requests": requests_total, "errors": errors, "concurrency": concurrency,
                          "throughput_rps": round(len(latencies) / seconds, 2), **percentiles(latencies),
                          "load_before_after": loads}
    out["throughput_on_over_off"] = round(out["batching_on"]["throughput_rps"] / out["batching_off"]["throughput_rps"], 3)
    return out


def environment() -> dict[str, Any]:
    import platform

    import faiss

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return {"device": device, "torch": torch.__version__, "faiss": faiss.__version__, "threads": torch.get_num_threads(),
            "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0}


__all__ = ["speed_vs_exhaustive_and_global", "quality_and_codecs", "decode_speed", "build_throughput", "phone_photos", "phone_photo_build", "serving", "environment"]
