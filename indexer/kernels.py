"""The rerank kernel this machine runs fastest, chosen by measuring it when an index is opened.

CPU flags say what a CPU can do, not what torch makes of it on this machine, under this load, for these
codes: so the :class:`~indexer.rerank.Reranker`'s kernels are timed on the index's own store. A kernel is a
compute dtype and a way of scoring (:func:`~indexer.rerank.kernel_name`):

- ``float32``: the gathered codes converted to float32 in one pass, then one batched matmul (scores equal to
  the per-query path's);
- ``float32-chunked``: the same, :data:`CHUNK_ITEMS` items' worth of queries at a time, each chunk read from
  the store's memory map, converted and scored in small buffers that stay in the CPU's cache, so the batch's
  codes are never copied whole (same scores up to float32 rounding);
- ``float16``: the codes as stored (SQfp16), the matmul in float16 (native on CUDA and on CPUs with float16
  arithmetic, emulated and slow elsewhere; scores within 2e-3 per word);
- ``bfloat16-chunked``: the chunked kernel with the chunk converted on to bfloat16 and the matmul in bfloat16
  (native on CPUs with AVX512-BF16 or AMX: 5x the float32 matmul's rate on such a CPU; emulated elsewhere, where
  the measurement drops it; scores within 3e-3 per word). Text batches of :data:`~indexer.rerank.HALF_FROM_QUERIES`
  queries or more only, as float16.

``auto`` precision measures all of them (on CUDA: float16 and float32); ``float32`` / ``float16`` measure
that dtype's kernels only (so ``float32`` keeps scores equal to the per-query path's). The sample is a batch
of :data:`SAMPLE_QUERIES` random text-shaped queries against :data:`SAMPLE_CANDIDATES` random items each (the
block layout of distinct queries), each kernel timed :data:`REPEATS` times in turns, the median kept: about
3 x 20 ms per kernel on an idle 2-core machine. Stores under ``SAMPLE_QUERIES * SAMPLE_CANDIDATES`` items keep
the default kernel: their rerank is too small to matter. The choice is kept per process for each (device,
store shape, precision).
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from alignsearch.models.model import EncoderOutput
from alignsearch.models.scoring import ScoringConfig

from .rerank import Reranker, compute_dtype, kernel_name, precision_dtype

CHUNK_ITEMS = 128  # items converted and scored at a time by the chunked kernel (7.5 MB of float32 at 49 x 384)
SAMPLE_QUERIES = 16
SAMPLE_CANDIDATES = 32
SAMPLE_WORDS = 12
REPEATS = 3


@dataclass
class Choice:
    """The kernel chosen, and each candidate's median time on the sample (ms; empty when not measured)."""

    kernel: str
    timings_ms: dict[str, float] = field(default_factory=dict)


def candidates(device: torch.device, precision: str) -> dict[str, tuple[torch.dtype, int]]:
    """The kernels worth timing for ``precision`` on ``device``: name -> (dtype, chunk items)."""
    wanted = precision_dtype(precision)
    kernels = {"float32": (torch.float32, 0), "float16": (torch.float16, 0)}
    if device.type == "cpu":  # a GPU's caches are not the point: no chunked variant there
        kernels["float32-chunked"] = (torch.float32, CHUNK_ITEMS)
        kernels["bfloat16-chunked"] = (torch.bfloat16, CHUNK_ITEMS)
    return {name: k for name, k in kernels.items() if wanted is None or k[0] == wanted}


def reranker_for(device: torch.device, dtype: torch.dtype, chunk_items: int, precision: str) -> Reranker:
    """A reranker running kernel (``dtype``, ``chunk_items``); under ``auto`` on a CPU small batches and image
    queries keep float32 (:data:`~indexer.rerank.HALF_FROM_QUERIES`)."""
    small = torch.float32 if precision == "auto" and device.type == "cpu" else dtype
    return Reranker(device, dtype, chunk_items=chunk_items, small_batch_dtype=small)


def _sample(store: Any, dim: int, seed: int = 0) -> tuple[EncoderOutput, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    local = torch.from_numpy(rng.standard_normal((SAMPLE_QUERIES, SAMPLE_WORDS, dim), dtype=np.float32))
    local = local / local.norm(dim=-1, keepdim=True)
    glob = local.mean(1)
    enc = EncoderOutput(glob / glob.norm(dim=-1, keepdim=True), local,
                        torch.ones(SAMPLE_QUERIES, SAMPLE_WORDS, dtype=torch.bool))
    rows = [np.sort(rng.choice(len(store), SAMPLE_CANDIDATES, replace=False)) for _ in range(SAMPLE_QUERIES)]
    return enc, rows


def measure(store: Any, device: torch.device, kernels: dict[str, tuple[torch.dtype, int]], precision: str = "auto",
            scoring: ScoringConfig | None = None, repeats: int = REPEATS) -> dict[str, float]:
    """Median ms of each kernel's rerank of the sample batch from ``store`` (timed in turns)."""
    scoring = scoring or ScoringConfig()
    enc, rows = _sample(store, int(store.dim))
    rerankers = {name: reranker_for(device, dtype, chunk, precision) for name, (dtype, chunk) in kernels.items()}
    spent: dict[str, list[float]] = {name: [] for name in rerankers}
    for round_ in range(repeats + 1):  # the first round warms up (buffers, page cache)
        for name, reranker in rerankers.items():
            start = time.perf_counter()
            reranker.rerank(enc, store, rows, True, scoring)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_:
                spent[name].append((time.perf_counter() - start) * 1000.0)
    return {name: round(statistics.median(times), 3) for name, times in spent.items()}


_chosen: dict[tuple, Choice] = {}
_lock = threading.Lock()


def choose(store: Any, device: torch.device | str, precision: str = "auto",
           scoring: ScoringConfig | None = None) -> tuple[Reranker, Choice]:
    """The reranker of the fastest kernel for ``store`` on ``device`` under ``precision`` (measured once per
    process for each device, store shape and precision), and the choice with its timings."""
    device = torch.device(device)
    kernels = candidates(device, precision)
    dtype = precision_dtype(precision) or compute_dtype(device)
    default = Choice(next(n for n, (d, chunk) in kernels.items() if d == dtype and not chunk))
    codes = getattr(store, "codes", None)
    if len(kernels) < 2 or codes is None or len(store) < SAMPLE_QUERIES * SAMPLE_CANDIDATES:
        choice = default
    else:
        key = (str(device), precision, int(store.dim), tuple(codes.shape[1:]), str(codes.dtype),
               bool(getattr(store, "fp16", False)))
        with _lock:
            choice = _chosen.get(key)
            if choice is None:
                timings = measure(store, device, kernels, precision, scoring)
                choice = _chosen[key] = Choice(min(timings, key=timings.__getitem__), timings)
    dtype, chunk = kernels[choice.kernel]
    if precision == "auto" and choice is default:  # unmeasured: exactly the flag-based default of before
        return Reranker(device), choice
    return reranker_for(device, dtype, chunk, precision), choice


__all__ = ["CHUNK_ITEMS", "Choice", "candidates", "choose", "kernel_name", "measure", "reranker_for"]
