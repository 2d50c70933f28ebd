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
from alignsearch.models.model import AlignModel
from alignsearch.models.scoring import ScoringConfig

from .synthetic import write_synthetic_index

QUERIES = ["a dog runs through the grass", "two children play football in a park", "a man rides a bike down a hill",
           "people walk along a busy street", "a girl in a pink dress climbs stairs", "a black dog swims in a lake",
           "a surfer rides a large wave", "a crowd watches a parade"]


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return round(statistics.median(times), 3)


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


def speed_vs_exhaustive_and_global(model: AlignModel, sizes: list[int], work: Path, repeats: int,
                                   candidates: int = 100) -> dict[str, Any]:
    """Benchmarks 1, 2 and 4 on synthetic indexes of each size."""
    out: dict[str, Any] = {}
    enc_one = model.encode_texts(QUERIES[:1])
    for n in sizes:
        index = Index(write_synthetic_index(work / f"synthetic-{n}", model, n), check="size")
        searcher = Searcher(index, model)
        query = QUERIES[0]
        row: dict[str, Any] = {"n": n, "regions": 49, "dim": model.embed_dim, "candidates": candidates}
        # 1. two-stage vs exhaustive (query already encoded: the search itself)
        row["two_stage_search_ms"] = median_ms(lambda: searcher.search_text_encoded(enc_one, 10, candidates), repeats)
        score = _exhaustive_scorer(index, searcher.scoring)
        row["exhaustive_search_ms"] = median_ms(lambda: score(enc_one), max(3, repeats // 5))
        row["speedup_two_stage_vs_exhaustive"] = round(row["exhaustive_search_ms"] / row["two_stage_search_ms"], 1)
        score = None  # frees the decoded collection before the next size
        # 2. end to end with encoding: global-only vs two-stage
        def global_only() -> None:
            enc = model.encode_texts([query])
            index.images.index.search(enc.global_emb.numpy(), 10)

        row["global_only_e2e_ms"] = median_ms(global_only, repeats)
        row["two_stage_e2e_ms"] = median_ms(lambda: searcher.search_text([query], 10, candidates), repeats)
        row["two_stage_over_global_only"] = round(row["two_stage_e2e_ms"] / row["global_only_e2e_ms"], 3)
        # 4. rerank bandwidth against a plain copy of the same bytes
        rows = searcher.coarse(enc_one.global_emb.numpy(), index.images, candidates)[0][0]
        store = index.images.store
        codes = store.codes
        bytes_gathered = int(store.lengths()[rows].sum()) * store.code_size
        rerank_ms = median_ms(lambda: searcher.rerank_scores(enc_one, 0, index.images, rows, True), repeats)
        source = np.ascontiguousarray(codes[: bytes_gathered // codes.shape[1]])
        target = np.empty_like(source)
        copy_ms = median_ms(lambda: np.copyto(target, source), repeats)
        row.update(rerank_ms=rerank_ms, rerank_bytes=bytes_gathered, memcpy_ms=copy_ms,
                   rerank_gb_s=round(bytes_gathered / rerank_ms / 1e6, 3),
                   memcpy_gb_s=round(bytes_gathered / copy_ms / 1e6, 3))
        row["rerank_fraction_of_copy_bandwidth"] = round(row["rerank_gb_s"] / row["memcpy_gb_s"], 4)
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


def build_throughput(model: AlignModel, images: Path, limit: int | None, work: Path) -> dict[str, Any]:
    """Benchmark 5: images/s of ``index build`` against the encoder's forward pass on pre-decoded images."""
    from alignsearch.indexer.build import BuildOptions, build
    from alignsearch.indexer.reader import list_images
    from alignsearch.models.preprocess import load_image

    files = list_images(images)[:limit]
    options = BuildOptions(images=images, out=work / "build-bench", files=files, progress=False, batch_size=32)
    start = time.perf_counter()
    build(model, options)
    build_s = time.perf_counter() - start
    pixels = torch.stack([model.preprocess_images([load_image(images / f)])[0] for f in files])
    start = time.perf_counter()
    for i in range(0, len(files), 32):
        model.encode_pixels(pixels[i : i + 32])
    forward_s = time.perf_counter() - start
    return {"images": len(files), "build_seconds": round(build_s, 2), "build_images_per_s": round(len(files) / build_s, 1),
            "forward_only_images_per_s": round(len(files) / forward_s, 1),
            "build_fraction_of_forward": round(forward_s / build_s, 3)}


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
                    start = time.perf_counter()
                    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 300)
                    return time.perf_counter() - start

            seconds = asyncio.run(run())
            lat = np.array(latencies)
            out[label] = {"requests": requests_total, "errors": errors, "concurrency": concurrency,
                          "throughput_rps": round(len(lat) / seconds, 2),
                          "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2)}
    out["throughput_on_over_off"] = round(out["batching_on"]["throughput_rps"] / out["batching_off"]["throughput_rps"], 3)
    return out


def environment() -> dict[str, Any]:
    import platform

    import faiss

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return {"device": device, "torch": torch.__version__, "faiss": faiss.__version__, "threads": torch.get_num_threads(),
            "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0}


__all__ = ["speed_vs_exhaustive_and_global", "quality_and_codecs", "decode_speed", "build_throughput", "serving", "environment"]
