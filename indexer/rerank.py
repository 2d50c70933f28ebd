"""The batched rerank: every query of a micro-batch scored against its own candidates in one pass.

1. gather, in one read: when the queries share most candidates (the union holds at most
   ``DENSE_UNION_FACTOR`` x the longest list), the union of the batch's candidates (rows sorted, so a cold
   page cache reads forward); otherwise each query's list laid out as Q x K (``block``: a candidate two queries
   share is read twice, which costs less than reading the union and copying it into that layout). On a store
   whose items all have the same token count (image grids) each item is one contiguous row of codes;
2. decode once: SQfp16 codes are read as float16 in place (no copy); other codecs go through the store's
   own decoder; variable-length items (captions) through the store's padded ``gather``;
3. score on the model's device in one batched matmul: ``dense``, each query against the whole union, then its
   own pairs picked; ``block``, one ``bmm`` of each query against its own K candidates. The pooling is
   :func:`models.alignment.pair_scores`, the same functions the per-pair path uses. Block batches are cut
   into chunks of queries only to bound memory (``BLOCK_BUDGET_BYTES``).

The matmul runs in ``float16`` on CUDA, whose tensor cores read the SQfp16 codes as they are, and on CPUs with
float16 arithmetic (AVX512-FP16 or AMX-FP16) for batches of :data:`HALF_FROM_QUERIES` text queries or more
(about 2x faster than float32 there, scores within 2e-3); in ``float32`` for smaller batches, for image queries
(captions are too short for float16 to pay off) and on other CPUs, where torch emulates float16 (bf16 was
measured slower as a plain kernel: converting the fp16 codes costs more than the matmul saves, see
docs/benchmarks.md; in cache-sized chunks, on a CPU with AVX512-BF16, it is the fastest: :mod:`indexer.kernels`
times the kernels when an index opens). The similarities are pooled in float32 either way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import threading

import numpy as np
import torch

from alignsearch.models.alignment import pair_scores
from alignsearch.models.model import EncoderOutput
from alignsearch.models.scoring import ScoringConfig

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}  # compute dtypes with a reusable CPU buffer
DENSE_UNION_FACTOR = 2  # dense scoring when the union holds at most this many times the longest candidate list
BLOCK_BUDGET_BYTES = 256 << 20  # at most this much of per-query candidate copies at once (block scoring)
# ``auto`` on a CPU with float16 arithmetic: text queries in batches of this many or more in float16 (1.6-2x
# faster here from 3 to 16 queries against photos' 49 regions at K=100); fewer in float32, where float16 was
# slower (1.7x for one query), and image queries too: against captions' few words float16 never won (docs/benchmarks.md)
HALF_FROM_QUERIES = 3


@dataclass
class Gathered:
    """The items read for a batch: ``rows`` (the union, sorted; or every query's list, in order, for block
    scoring), ``tokens`` U x T x D, ``mask`` U x T (on device; None when a chunked kernel scored them chunk by
    chunk without keeping them)."""

    rows: np.ndarray
    tokens: torch.Tensor | None
    mask: torch.Tensor | None
    nbytes: int  # bytes of codes read from the store


@dataclass
class Reranked:
    """Local scores of a batch: ``scores`` Q x K float32 (CPU; entries past a query's candidates are 0),
    ``positions`` Q x K (each candidate's index in ``gathered``), what was gathered (on CPU it may lie in the
    reranker's reusable buffers: valid until the next rerank on the same thread)."""

    scores: torch.Tensor
    positions: torch.Tensor
    gathered: Gathered
    store: Any = None  # read again by :meth:`candidates` when the batch was scored in chunks (``tokens`` None)

    def candidates(self, q: int, order: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Query ``q``'s candidates at ``order`` (positions in its list): float32 tokens and mask, on CPU."""
        at = self.positions[q, torch.as_tensor(order, dtype=torch.long)]
        if self.gathered.tokens is None:  # scored chunk by chunk, nothing kept: these few items read again
            return self.store.gather(self.gathered.rows[at.numpy()])
        at = at.to(self.gathered.tokens.device)
        return self.gathered.tokens[at].float().cpu(), self.gathered.mask[at].cpu()


def _lengths(store: Any, rows: np.ndarray) -> np.ndarray:
    """Token counts of ``rows`` (from the offsets, without a pass over the whole store)."""
    offsets = getattr(store, "offsets", None)
    return store.lengths()[rows] if offsets is None else offsets[rows + 1] - offsets[rows]


class Workspace:
    """Reusable buffers, one set per thread: a batch's gathered codes and their float32 copy are tens of MB,
    and an allocation that large is a fresh ``mmap`` each time (glibc), whose page faults cost more than the
    copy itself. Buffers grow to the largest batch seen and stay; what they hold is valid until the next
    rerank on the same thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype`` over the thread's buffer ``name``."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buffers = self._local.__dict__.setdefault("buffers", {})
        if name not in buffers or len(buffers[name]) < nbytes:
            buffers[name] = np.empty(nbytes, dtype=np.uint8)
        return buffers[name][:nbytes].view(dtype).reshape(shape)


def _uniform_rows(store: Any, rows: np.ndarray, workspace: Workspace | None = None,
                  prefetch: bool = True) -> np.ndarray | None:
    """The codes of ``rows`` as one U x (T * code_size) uint8 array when every item of the store has the same
    token count T (one contiguous row per item), else None. ``prefetch`` False: the caller has already asked
    for these rows' pages (:meth:`LocalStore.prefetch`)."""
    codes, offsets = getattr(store, "codes", None), getattr(store, "offsets", None)
    if codes is None or offsets is None or len(rows) == 0:
        return None
    width = int(offsets[rows[0] + 1] - offsets[rows[0]])
    if width == 0 or len(codes) % width or int(offsets[-1]) != len(offsets[:-1]) * width:
        return None
    if not np.array_equal(offsets[rows], rows * width):
        return None
    if prefetch:
        store.prefetch(rows)  # cold pages read in one round, not a fault (and a read-ahead window) per item
    table = codes.reshape(-1, width * codes.shape[1])
    if workspace is None:
        return table[rows]
    out = workspace.get("codes", (len(rows), table.shape[1]), table.dtype)
    source = getattr(store, "codes_tensor", None)
    if source is None or not source.is_contiguous() or table.dtype != np.uint8 or table.shape[1] % 8:
        return np.take(table, rows, axis=0, out=out, mode="clip")  # rows checked above ("raise" copies twice)
    # torch's index_select over 8-byte words: 2.3x faster than np.take here (which copies byte-wise rows)
    torch.index_select(source.view(-1, table.shape[1]).view(torch.int64), 0, torch.from_numpy(rows),
                       out=torch.from_numpy(out).view(torch.int64))
    return out


def gather(store: Any, rows: np.ndarray, device: torch.device, workspace: Workspace | None = None,
           decode_on_device: bool | None = None, prefetch: bool = True) -> Gathered:
    """Read and decode the items ``rows`` of a local store (in that order; sorted reads best cold), onto
    ``device``; into ``workspace``'s buffer when one is given. A store that can decode on the device
    (``decodes_on_device``: PQ codes) sends its codes there and decodes them there, when ``device`` is not the
    CPU (``decode_on_device`` None) or when asked to."""
    rows = np.asarray(rows, dtype=np.int64)
    block = _uniform_rows(store, rows, workspace, prefetch)
    if block is None:  # captions (variable length) or a store without plain codes: its own padded gather
        tokens, mask = store.gather(rows)
        nbytes = int(_lengths(store, rows).sum()) * int(store.code_size)
    else:
        n, dim = len(rows), int(store.dim)
        flat = block.reshape(-1, store.codes.shape[1])
        if decode_on_device is None:
            decode_on_device = device.type != "cpu"
        if getattr(store, "fp16", False):
            tokens = torch.from_numpy(block).view(torch.float16).view(n, -1, dim)
        elif decode_on_device and getattr(store, "decodes_on_device", False):  # decoded where it is scored
            tokens = store.decode_tensor(torch.from_numpy(flat).to(device, non_blocking=True)).view(n, -1, dim)
        else:
            tokens = store.decode(flat).view(n, -1, dim)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
        nbytes = block.nbytes
    return Gathered(rows, tokens.to(device, non_blocking=True), mask.to(device, non_blocking=True), nbytes)


PRECISIONS = ("auto", "float32", "float16")


def precision_dtype(precision: str) -> torch.dtype | None:
    """The rerank's compute dtype for a precision name (``auto``: None, i.e. :func:`compute_dtype` of the device).

    float32 keeps scores equal to the per-query path's; float16 is within 2e-3 per word."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown rerank precision (choose from {', '.join(PRECISIONS)})")
    return None if precision == "auto" else getattr(torch, precision)


@functools.lru_cache(maxsize=1)
def cpu_has_float16_arithmetic(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in float16 natively (AMX-FP16, or AVX512-FP16 in ``cpuinfo``'s flags), so
    that torch's float16 matmul beats float32; elsewhere torch emulates it, much slower."""
    amx = getattr(torch.cpu, "_is_amx_fp16_supported", None)
    if amx is not None and amx():
        return True
    try:
        with open(cpuinfo) as fh:
            return any(line.startswith("flags") and "avx512_fp16" in line.split() for line in fh)
    except OSError:  # not Linux: assume not
        return False


def kernel_name(dtype: torch.dtype, chunk_items: int = 0) -> str:
    """A rerank kernel's name: its compute dtype, ``-chunked`` when it scores the codes in cache-sized chunks."""
    return str(dtype).replace("torch.", "") + ("-chunked" if chunk_items else "")


def compute_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA (tensor cores; SQfp16 codes as stored) and on CPUs with float16 arithmetic (2-2.4x
    faster than float32 there: 41% of memcpy bandwidth against 18%, docs/benchmarks.md), float32 on other CPUs."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_float16_arithmetic()):
        return torch.float16
    return torch.float32


class Reranker:
    """Scores a batch of encoded queries against their candidates on ``device`` in ``dtype`` (None: the
    device's :func:`compute_dtype`; float16 there on a CPU means float32 for image queries and for batches under
    :data:`HALF_FROM_QUERIES` queries, see :meth:`dtype_for`)."""

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 decode_on_device: bool | None = None, chunk_items: int = 0,
                 small_batch_dtype: torch.dtype | None = None) -> None:
        """``chunk_items`` > 0: the candidates' codes are read, converted and scored that many items' worth of
        queries at a time (:meth:`_fused`; in buffers that stay in the CPU's cache) instead of all at once; ``small_batch_dtype``: the dtype of
        small batches and image queries (None: float32 on a CPU when ``dtype`` is None, else ``dtype``)."""
        self.device = torch.device(device)
        self.dtype = dtype or compute_dtype(self.device)
        if small_batch_dtype is None:
            small_batch_dtype = torch.float32 if dtype is None and self.device.type == "cpu" else self.dtype
        self.small_batch_dtype = small_batch_dtype
        self.decode_on_device = decode_on_device  # None: PQ codes are decoded on the device unless it is the CPU
        self.chunk_items = max(0, int(chunk_items))
        self.kernel = kernel_name(self.dtype, self.chunk_items)
        self._workspace = Workspace()

    def rerank(self, enc: EncoderOutput, store: Any, rows_per_query: Sequence[np.ndarray], query_is_text: bool,
               scoring: ScoringConfig) -> Reranked:
        """Local alignment scores of each query ``q`` of ``enc`` against its candidates ``rows_per_query[q]``."""
        counts = np.array([len(r) for r in rows_per_query], dtype=np.int64)
        q_count, width = len(counts), int(counts.max()) if len(counts) else 0
        valid = np.arange(width)[None, :] < counts[:, None]
        listed = np.zeros((q_count, width), dtype=np.int64)
        listed[valid] = np.concatenate([np.asarray(r, np.int64) for r in rows_per_query] or [np.zeros(0, np.int64)])
        listed = np.where(valid, listed, listed[:, :1])  # each query's rows, padded with its first
        union, inverse = np.unique(listed[valid], return_inverse=True)
        if width == 0:
            return Reranked(torch.zeros(q_count, 0), torch.zeros(q_count, 0, dtype=torch.long),
                            gather(store, union, self.device, decode_on_device=self.decode_on_device))
        queries, q_mask = self.queries_on_device(enc, query_is_text)
        if len(union) <= DENSE_UNION_FACTOR * width:
            positions = np.zeros((q_count, width), dtype=np.int64)
            positions[valid] = inverse.ravel()
            gathered = gather(store, union, self.device, self._workspace, self.decode_on_device)
            at = torch.from_numpy(positions)
            scores = self.score_gathered(queries, q_mask, gathered, query_is_text, scoring).gather(1, at.to(self.device))
        elif self.chunk_items:
            gathered, scores = self._fused(queries, q_mask, store, listed, width, query_is_text, scoring)
            at = torch.arange(q_count * width).view(q_count, width)
        else:
            item_bytes = max(1, int(store.dim) * max(1, int(_lengths(store, union).max())))
            step = max(1, BLOCK_BUDGET_BYTES // (width * item_bytes * torch.finfo(queries.dtype).bits // 8))
            parts = []
            workspace = self._workspace if step >= q_count else None  # chunks each keep their own gather
            for s in range(0, q_count, step):
                part = gather(store, listed[s : s + step].ravel(), self.device, workspace, self.decode_on_device)
                parts.append((part, self._block(queries[s : s + step], q_mask[s : s + step],
                                                self._compute(part.tokens, queries.dtype), part.mask, width,
                                                query_is_text, scoring)))
            gathered = parts[0][0] if len(parts) == 1 else _joined([p for p, _ in parts])
            scores = torch.cat([score for _, score in parts])
            at = torch.arange(q_count * width).view(q_count, width)
        scores = scores.float().cpu().masked_fill(torch.from_numpy(~valid), 0.0)
        return Reranked(scores, at, gathered, store)

    def _fused(self, queries: torch.Tensor, q_mask: torch.Tensor, store: Any, listed: np.ndarray, width: int,
               query_is_text: bool, scoring: ScoringConfig) -> tuple[Gathered, torch.Tensor]:
        """Block scoring by the chunked kernel: ``chunk_items`` items' worth of queries at a time, each chunk
        read from the store, converted and scored in small buffers that stay in the CPU's cache (the batch's
        codes are never copied whole). Their pages are asked for once, for the whole batch."""
        prefetch = getattr(store, "prefetch", None)
        if prefetch is not None:
            prefetch(np.unique(listed))
        step = max(1, self.chunk_items // width)
        parts, nbytes = [], 0
        for s in range(0, len(queries), step):
            part = gather(store, listed[s : s + step].ravel(), self.device, self._workspace, self.decode_on_device,
                          prefetch=False)
            nbytes += part.nbytes
            parts.append(self._block(queries[s : s + step], q_mask[s : s + step],
                                     self._compute(part.tokens, queries.dtype), part.mask, width, query_is_text,
                                     scoring))
        return Gathered(listed.ravel(), None, None, nbytes), torch.cat(parts)

    def dtype_for(self, queries: int, query_is_text: bool = True) -> torch.dtype:
        """The compute dtype of a batch of ``queries`` (text queries against photos, or image queries against
        captions)."""
        return self.dtype if query_is_text and queries >= HALF_FROM_QUERIES else self.small_batch_dtype

    def queries_on_device(self, enc: EncoderOutput, query_is_text: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries' local vectors in the batch's compute dtype (:meth:`dtype_for`) on the device, and their
        boolean mask. The candidates are scored in the queries' dtype."""
        return enc.local.to(self.device, self.dtype_for(len(enc), query_is_text)), enc.mask.to(self.device).bool()

    def score_gathered(self, queries: torch.Tensor, q_mask: torch.Tensor, gathered: Gathered, query_is_text: bool,
                       scoring: ScoringConfig) -> torch.Tensor:
        """Every query (from :meth:`queries_on_device`) against every item of ``gathered`` (from :func:`gather`
        on this device): Q x U local scores. The scoring step of :meth:`rerank` alone, without the gather."""
        tokens, mask = gathered.tokens, gathered.mask
        step = self.chunk_items or max(1, len(tokens))
        parts = [self._dense(queries, q_mask, self._compute(tokens[s : s + step], queries.dtype), mask[s : s + step],
                             query_is_text, scoring) for s in range(0, max(1, len(tokens)), step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @staticmethod
    def _dense(queries: torch.Tensor, q_mask: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
               query_is_text: bool, scoring: ScoringConfig) -> torch.Tensor:
        """Every query against every gathered item: Q x U."""
        if query_is_text:  # contiguous: a reduction over a strided view was up to 2000x slower (bench.ceilings)
            sims = torch.einsum("qwd,urd->quwr", queries, tokens).float().contiguous()
            return pair_scores(sims, q_mask[:, None, :], mask[None], scoring.alignment, scoring.lse_lambda)
        sims = torch.einsum("uwd,qrd->quwr", tokens, queries).float()
        return pair_scores(sims, mask[None], q_mask[:, None, :], scoring.alignment, scoring.lse_lambda)

    def _compute(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``tokens`` in ``dtype``; on CPU converted into the thread's reusable buffer (bfloat16 through a float32
        one: torch's direct float16 -> bfloat16 conversion was 8x slower than the two vectorised steps here)."""
        if tokens.dtype == dtype:
            return tokens
        if tokens.device.type == "cpu" and dtype == torch.bfloat16:  # numpy has no bfloat16: an int16 buffer
            wide = self._compute(tokens, torch.float32)
            out = self._workspace.get("compute_bf16", tuple(tokens.shape), np.int16)
            return torch.from_numpy(out).view(torch.bfloat16).copy_(wide)
        if tokens.device.type != "cpu" or dtype not in _NUMPY:
            return tokens.to(dtype)
        return torch.from_numpy(self._workspace.get("compute", tuple(tokens.shape), _NUMPY[dtype])).copy_(tokens)

    @staticmethod
    def _block(queries: torch.Tensor, q_mask: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, width: int,
               query_is_text: bool, scoring: ScoringConfig) -> torch.Tensor:
        """Each query against its own ``width`` candidates (``tokens``: Q*K items, query-major): Q x K."""
        candidates = tokens.view(len(queries), width, *tokens.shape[1:])
        c_mask = mask.view(len(queries), width, -1)
        if query_is_text:  # (K*R x D) @ (D x W) per query, then Q x K x W x R made contiguous for the pooling:
            # 20% faster than the einsum's (W x D) @ (D x K*R) here, and the pooling's reduction is over a
            # contiguous axis (over a strided view it was up to 2000x slower on a busy machine)
            q, k, r, d = candidates.shape
            sims = torch.matmul(candidates.reshape(q, k * r, d), queries.transpose(1, 2))
            sims = sims.view(q, k, r, -1).transpose(2, 3).float().contiguous()
            return pair_scores(sims, q_mask[:, None, :], c_mask, scoring.alignment, scoring.lse_lambda)
        sims = torch.einsum("qkwd,qrd->qkwr", candidates, queries).float()
        return pair_scores(sims, c_mask, q_mask[:, None, :], scoring.alignment, scoring.lse_lambda)


def _joined(parts: list[Gathered]) -> Gathered:
    """Chunks of a block batch as one (their token axes padded to the longest)."""
    width = max(p.tokens.shape[1] for p in parts)

    def pad(x: torch.Tensor) -> torch.Tensor:
        extra = width - x.shape[1]
        return x if extra == 0 else torch.cat([x, x.new_zeros((x.shape[0], extra, *x.shape[2:]))], dim=1)

    return Gathered(np.concatenate([p.rows for p in parts]), torch.cat([pad(p.tokens) for p in parts]),
                    torch.cat([pad(p.mask) for p in parts]), sum(p.nbytes for p in parts))


__all__ = ["PRECISIONS", "Gathered", "HALF_FROM_QUERIES", "Reranked", "Reranker", "compute_dtype",
           "cpu_has_float16_arithmetic", "gather", "kernel_name", "precision_dtype"]
