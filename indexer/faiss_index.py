"""Global vectors in FAISS: choosing the index type, building it, and using a GPU when there is one.

The index type follows the FAISS wiki's guidelines (as autofaiss does): exact ``Flat`` for small collections,
``HNSW32,Flat`` in the middle while the vectors fit in memory, ``IVF{nlist},Flat`` for large ones, and
``OPQ{m}_{d'},IVF{nlist},PQ{m}`` when the raw vectors do not fit the memory budget. Any factory string can be
given instead. Vectors are L2-normalised, so inner product is cosine similarity; FAISS ids are row ids.
"""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

FLAT_MAX = 50_000
HNSW_MAX = 1_000_000


def choose_factory(n: int, dim: int, memory_budget_bytes: float = 4e9) -> str:
    """An index-factory string for ``n`` vectors of ``dim`` floats within ``memory_budget_bytes``."""
    raw = n * dim * 4
    nlist = max(1, min(65536, int(4 * math.sqrt(max(n, 1)))))
    if raw > memory_budget_bytes:
        m = max(8, min(64, dim // 4))
        while dim % m:
            m -= 1
        return f"OPQ{m}_{m * 4},IVF{nlist},PQ{m}"
    if n <= FLAT_MAX:
        return "Flat"
    if n <= HNSW_MAX and raw * 1.5 <= memory_budget_bytes:
        return "HNSW32,Flat"
    return f"IVF{nlist},Flat"


def validate_factory(factory: str, dim: int) -> None:
    """Raise ValueError naming the problem when ``factory`` is not a valid index-factory string for ``dim``."""
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"invalid FAISS factory string {factory!r} for dimension {dim}: {str(exc).splitlines()[0]}") from exc


def gpu_available() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def build_global_index(vectors: np.ndarray, ids: np.ndarray, factory: str) -> faiss.Index:
    """Train (when the type needs it) and fill an inner-product index with ``ids``."""
    dim = vectors.shape[1]
    base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexIDMap2(base)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not index.is_trained:
        if len(vectors) == 0:
            raise ValueError(f"FAISS index {factory!r} needs training vectors")
        base.train(vectors)
    if len(vectors):
        index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def empty_like(index: faiss.Index) -> faiss.Index:
    """A copy of ``index`` with its vectors removed (keeps training)."""
    clone = faiss.clone_index(index)
    clone.reset()
    return clone


def write(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def read(path: Path, use_gpu: bool = True) -> faiss.Index:
    """Read an index (memory-mapped when possible); moved to the GPU when one is present."""
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        index = faiss.read_index(str(path))
    if use_gpu and gpu_available():
        try:
            return faiss.index_cpu_to_all_gpus(index)
        except (RuntimeError, AttributeError):  # index type without a GPU version: stay on the CPU
            return index
    return index


def describe(index: faiss.Index) -> str:
    """The type of the wrapped index, e.g. ``IndexFlatIP``."""
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    return type(inner).__name__


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove ``ids`` where the index type supports it; returns how many were removed (0 for HNSW)."""
    try:
        return int(index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))
    except RuntimeError:
        return 0
