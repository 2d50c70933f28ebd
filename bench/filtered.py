"""Filtered search on a synthetic index: speed against the unfiltered two-stage search, and exactness against
the brute-force reference, at selectivities from 0.1% to 100%.

``python -m alignsearch.bench.filtered --n 100000 --work DIR --json OUT.json`` writes, per filter, the p50 and
p90 of the search (coarse + rerank of one encoded query, k=10, candidates=100; the encoding is the same with
or without a filter and is left out), its ratio to the unfiltered search's p50, and whether every query's top
k equals the reference's: every allowed row's global score (its stored vector), the top ``candidates``
reranked with the searcher's own scoring. The allowed set of a filter is computed once and cached (as the
server does for a repeated filter); ``first_ms`` is the first search with it, SQLite included.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignsearch.models.scoring import rank

from .cli import emit_report

QUERIES = ["a dog runs through the grass", "children playing in the snow", "a red car parked on a street",
           "a man rides a bike", "two people on a beach", "a girl in a pink dress", "a bird on a branch",
           "a crowd watching a concert", "a boat on a lake", "a woman holding an umbrella"]
FILTERS = {  # name -> (filter, share of the collection it allows)
    "0.1%": ({"must": [{"key": "group", "match": {"value": 7}}]}, 0.001),
    "1%": ({"must": [{"key": "bucket", "match": {"value": 3}}]}, 0.01),
    "10%": ({"must": [{"key": "bucket", "range": {"gte": 10, "lt": 20}}]}, 0.10),
    "50%": ({"must": [{"key": "half", "match": {"value": True}}]}, 0.50),
    "100%": ({}, 1.0),
}


def synthetic_fields(i: int) -> dict[str, list[Any]]:
    """The fields of synthetic image ``i``: ``group`` (1,000 values), ``bucket`` (100), ``half`` (bool)."""
    return {"group": [i % 1000], "bucket": [i % 100], "half": [i % 2 == 0]}


def reference(searcher: Any, enc: Any, allowed: np.ndarray, k: int, candidates: int, offset: int = 0
              ) -> list[tuple[list[str], np.ndarray]]:
    """Brute force for each query of ``enc``: the global score of every ``allowed`` row (stored vectors), the
    top ``candidates`` reranked with the searcher's scoring; (ids, fused scores) of ranks offset+1..offset+k."""
    col = searcher.index.images
    vectors = np.asarray(col.index.vectors(allowed), dtype=np.float32)
    g_all = enc.global_emb.numpy() @ vectors.T
    out = []
    for q in range(len(g_all)):
        order = np.lexsort((allowed, -g_all[q]))[:candidates]
        rows = allowed[order]
        reranked = searcher.rerank(enc.select([q]), col, [rows], True)
        g = torch.from_numpy(np.ascontiguousarray(g_all[q][order][None, :], dtype=np.float32))
        fused = searcher.scoring.fuse(g, reranked.scores)[0]
        top = rank(fused, rows, offset + k)[offset:]
        ids = searcher.index.rows("images", rows[top].tolist())
        out.append(([ids[r]["id"] for r in rows[top].tolist()], fused.numpy()[top]))
    return out


def _times(fn: Any, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000.0)
    return out


def run(n: int, work: Path, regions: int = 49, repeats: int = 3, device: str = "cpu", k: int = 10,
        candidates: int = 100, global_spec: str | None = "Flat") -> dict[str, Any]:
    from alignsearch.indexer.index import Index
    from alignsearch.indexer.search import Searcher
    from alignsearch.models import load_model

    from .synthetic import write_synthetic_index

    model = load_model(device=device)
    start = time.perf_counter()
    folder = write_synthetic_index(work / f"filtered-{n}", model, n, regions=regions, global_spec=global_spec,
                                   fields=synthetic_fields)
    build_s = time.perf_counter() - start
    searcher = Searcher(Index(folder), model, rerank_precision="float32")
    enc = model.encode_texts(QUERIES)
    singles = [enc.select([q]) for q in range(len(QUERIES))]
    report: dict[str, Any] = {"n": n, "regions": regions, "k": k, "candidates": candidates, "device": device,
                              "global_index": searcher.index.images.index.describe()["type"],
                              "machine": platform.processor() or platform.machine(), "queries": len(QUERIES),
                              "repeats": repeats, "index_seconds": round(build_s, 1), "cases": {}}

    def timed(filter_: Any) -> list[float]:
        return [t for one in singles for t in _times(
            lambda one=one: searcher.search_text_encoded(one, k, candidates, filter=filter_), repeats)]

    timed(None)  # warm: pages of the index in memory
    base = timed(None)
    report["unfiltered"] = {"p50_ms": round(float(np.percentile(base, 50)), 3),
                            "p90_ms": round(float(np.percentile(base, 90)), 3)}
    for name, (filter_, share) in FILTERS.items():
        start = time.perf_counter()
        found = searcher.search_text_encoded(enc, k, candidates, filter=filter_)
        first_ms = (time.perf_counter() - start) * 1000.0 / len(QUERIES)
        allowed = searcher.index.allowed("images", filter_).rows
        exact = all([h.id for h in f.hits] == ids for f, (ids, _) in zip(found, reference(searcher, enc, allowed, k,
                                                                                          candidates)))
        times = timed(filter_)
        p50 = float(np.percentile(times, 50))
        report["cases"][name] = {"share": share, "allowed": int(len(allowed)), "exact_top_k": exact,
                                 "p50_ms": round(p50, 3), "p90_ms": round(float(np.percentile(times, 90)), 3),
                                 "first_ms": round(first_ms, 3),
                                 "p50_ratio_to_unfiltered": round(p50 / report["unfiltered"]["p50_ms"], 3)}
        print(name, json.dumps(report["cases"][name]), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m alignsearch.bench.filtered", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="synthetic images")
    p.add_argument("--regions", type=int, default=49)
    p.add_argument("--work", type=Path, required=True, help="folder for the synthetic index (reused when the same)")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--global-spec", default="Flat", help="FAISS factory of the global index ('chosen': by size)")
    args = p.parse_args(argv)
    spec = None if args.global_spec == "chosen" else args.global_spec
    report = run(args.n, args.work, args.regions, args.repeats, args.device, global_spec=spec)
    emit_report(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
