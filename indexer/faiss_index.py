"""Global vectors in FAISS (the ``faiss`` global store backend): choosing the index type, building it, and
using a GPU when there is one.

The index type follows the FAISS wiki's guidelines (as autofaiss does): exact ``Flat`` for small collections,
``HNSW32,Flat`` in the middle while the vectors fit in memory, ``IVF{nlist},Flat`` for large ones, and
``OPQ{m}_{d'},IVF{nlist},PQ{m}`` when the raw vectors do not fit the memory budget. Any factory string can be
given instead. Vectors are L2-normalised, so inner product is cosine similarity; FAISS ids are row ids.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np

from .layout import GLOBAL_FILE, atomic_path

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


def _ivf(index: faiss.Index) -> faiss.Index | None:
    """The IVF index inside ``index`` (also under a pre-transform such as OPQ), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return None


def _ivf_params(index: faiss.Index, nprobe: int) -> Any:
    """Per-search parameters that set ``nprobe`` for ``index`` (an IVF, or one under a pre-transform such as
    OPQ), without changing the shared index; None for other wrappers."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=nprobe)
    if isinstance(index, faiss.IndexPreTransform):
        inner = _ivf_params(index.index, nprobe)
        if inner is not None:
            params = faiss.SearchParametersPreTransform()
            params.index_params = inner
            params.inner = inner  # keeps the inner object alive as long as the outer one
            return params
    return None


HNSW_MAX_EF = 4096


def _selector_params(index: faiss.Index, sel: Any, k: int, nprobe: int | None = None, share: float = 1.0) -> Any:
    """Per-search parameters that restrict ``index`` to the ids ``sel`` selects: an IVF (also under OPQ) with
    ``nprobe`` probes, an ``IndexIDMap2`` over a flat or HNSW index. HNSW explores ``2 k / share`` nodes (at
    least its ``efSearch``, at most ``HNSW_MAX_EF``), ``share`` the fraction of ids selected: about 2 k of the
    nodes it visits are then selected ones, which keeps its recall near the unfiltered search's."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe or index.nprobe)
    if isinstance(index, faiss.IndexPreTransform):
        inner = _selector_params(index.index, sel, k, nprobe, share)
        params = faiss.SearchParametersPreTransform()
        params.index_params = inner
        params.inner = inner  # keeps the inner object alive as long as the outer one
        return params
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if isinstance(inner, faiss.IndexHNSW):
        ef = max(inner.hnsw.efSearch, k, min(HNSW_MAX_EF, int(2 * k / max(share, 1e-6))))
        return faiss.SearchParametersHNSW(sel=sel, efSearch=ef)
    return faiss.SearchParameters(sel=sel)


def new_index(dim: int, factory: str, sample: np.ndarray | Callable[[], np.ndarray]) -> faiss.Index:
    """An empty inner-product index whose FAISS ids are row ids (``add_with_ids``), trained on ``sample`` when
    the type needs training (on the GPU when there is one; the trained index lives on the CPU). ``sample`` may
    be a function returning it, called only when training is needed.

    IVF indexes store ids themselves (and ``remove_ids`` by id); others are wrapped in ``IndexIDMap2``. An IVF
    must not be wrapped: ``IndexIDMap.remove_ids`` assumes the inner index renumbers what remains, which only
    the flat index does, so deleting from a wrapped IVF returns wrong ids afterwards."""
    base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not base.is_trained:
        sample = np.ascontiguousarray(sample() if callable(sample) else sample, dtype=np.float32)
        if len(sample) == 0:
            raise ValueError(f"FAISS index {factory!r} needs training vectors")
        base = _train(base, sample)
    return base if _ivf(base) is not None else faiss.IndexIDMap2(base)


def stored_ids(index: faiss.Index) -> np.ndarray | None:
    """The ids held by ``index`` (sorted), or None when its type does not say."""
    if hasattr(index, "id_map"):
        return np.sort(faiss.vector_to_array(index.id_map))
    ivf = _ivf(index)
    if ivf is None:
        return None
    invlists = ivf.invlists
    parts = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
             for i in range(ivf.nlist) if invlists.list_size(i)]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def _train(base: faiss.Index, sample: np.ndarray) -> faiss.Index:
    if gpu_available():
        try:
            gpu = faiss.index_cpu_to_all_gpus(base)
            gpu.train(sample)
            return faiss.index_gpu_to_cpu(gpu)
        except (RuntimeError, AttributeError):  # no GPU version of this type: train on the CPU
            pass
    base.train(sample)
    return base


def training_size(factory: str, n: int) -> int:
    """How many vectors to train ``factory`` on: FAISS asks for 30-256 per IVF list (and 256 per PQ code)."""
    match = re.search(r"IVF(\d+)", factory)
    per_list = 256 * int(match.group(1)) if match else 0
    return min(n, max(per_list, 65_536))


def default_search_params(index: faiss.Index) -> str:
    """Search-time settings for a built index: IVF probes ~1/16 of its lists (at least 16), HNSW explores 128
    candidates (FAISS raises both to what a query's k needs). Empty for exact indexes."""
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    params = []
    ivf = _ivf(index)
    if ivf is not None:
        params.append(f"nprobe={min(ivf.nlist, max(16, ivf.nlist // 16))}")
    if isinstance(faiss.downcast_index(inner), faiss.IndexHNSW):
        params.append("efSearch=128")
    return ",".join(params)


def set_search_params(index: faiss.Index, params: str) -> None:
    """Apply ``nprobe=..,efSearch=..`` style settings (a FAISS ParameterSpace string)."""
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)


def write(index: faiss.Index, path: Path) -> None:
    """Write ``index`` to ``path`` atomically (temp file, then rename)."""
    with atomic_path(Path(path)) as tmp:
        faiss.write_index(index, str(tmp))


def read(path: Path, search_params: str | None = None) -> faiss.Index:
    """Read an index (memory-mapped when possible) with its search settings (``search_params``, else
    :func:`default_search_params`)."""
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        index = faiss.read_index(str(path))
    set_search_params(index, default_search_params(index) if search_params is None else search_params)
    return index


GPU_MAX_K = 2048  # FAISS's GPU indexes return at most this many neighbours per query


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A copy of ``index`` on the GPUs when faiss-gpu sees any, else ``index`` itself (same results)."""
    if not gpu_available():
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError):  # index type without a GPU version: stay on the CPU
        return index


def describe(index: faiss.Index) -> str:
    """The type of the (wrapped) index, e.g. ``IndexFlat``, ``IndexHNSWFlat``, ``IndexIVFPQ``."""
    ivf = _ivf(index)
    if ivf is not None:
        return type(faiss.downcast_index(ivf)).__name__
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    return type(inner).__name__


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove ``ids`` where the index type supports it; returns how many were removed (0 for HNSW)."""
    try:
        return int(index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))
    except RuntimeError:
        return 0


class FaissGlobalStore:
    """The global store of one collection as a FAISS index (``global.faiss``); ids are row ids.

    Searches run on a GPU copy when faiss-gpu sees a GPU, and on the CPU original for k beyond what GPU
    indexes return. Removal is real for flat and IVF indexes; HNSW cannot remove, so its removed ids stay in
    the index and the search skips them (tombstones in the metadata)."""

    backend = "faiss"

    def __init__(self, index: faiss.Index, factory: str, use_gpu: bool = False) -> None:
        self.cpu_index = index
        self.factory = factory
        self.index = to_gpu(index) if use_gpu else index
        self._ivf = _ivf(index)  # the IVF layer inside, if any: fixed for the life of the store

    @property
    def real_deletes(self) -> bool:
        """Whether :meth:`remove` takes items out of the index (else only the metadata tombstones them)."""
        inner = faiss.downcast_index(self.cpu_index.index) if hasattr(self.cpu_index, "index") else self.cpu_index
        return not isinstance(faiss.downcast_index(inner), faiss.IndexHNSW)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each n x k; ids -1 only where fewer than k items exist.

        An IVF index probes ``nprobe`` lists, which may hold fewer than k vectors: queries that come back
        short are searched again with 4x the probes (up to every list), so k items held means k returned."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        index = self.cpu_index if k > GPU_MAX_K else self.index
        scores, ids = index.search(queries, k)
        ivf = self._ivf
        want = min(k, self.count())
        if ivf is None or want == 0:
            return scores, ids
        short = np.flatnonzero((ids[:, :want] < 0).any(axis=1))
        nprobe = ivf.nprobe
        while len(short) and nprobe < ivf.nlist:
            nprobe = min(ivf.nlist, nprobe * 4)
            params = _ivf_params(self.cpu_index, nprobe)
            if params is None:
                break
            more_scores, more_ids = self.cpu_index.search(queries[short], k, params=params)
            scores[short], ids[short] = more_scores, more_ids
            short = short[(more_ids[:, :want] < 0).any(axis=1)]
        return scores, ids

    def search_ids(self, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` among ``ids`` only (sorted row ids), through a FAISS ID selector on the CPU index
        (GPU indexes take none). An IVF whose probed lists hold fewer than k of the ids is searched again with
        4x the probes, up to every list."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        sel = faiss.IDSelectorBatch(ids)
        share = len(ids) / max(self.count(), 1)
        scores, found = self.cpu_index.search(queries, k, params=_selector_params(self.cpu_index, sel, k, share=share))
        ivf, want = self._ivf, min(k, len(ids))
        if ivf is None:
            return scores, found
        short = np.flatnonzero((found[:, :want] < 0).any(axis=1))
        nprobe = ivf.nprobe
        while len(short) and nprobe < ivf.nlist:
            nprobe = min(ivf.nlist, nprobe * 4)
            params = _selector_params(self.cpu_index, sel, k, nprobe)
            more_scores, more_ids = self.cpu_index.search(queries[short], k, params=params)
            scores[short], found[short] = more_scores, more_ids
            short = short[(more_ids[:, :want] < 0).any(axis=1)]
        return scores, found

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(ids):
            self.cpu_index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                        np.ascontiguousarray(ids, dtype=np.int64))
            self.index = self.cpu_index if self.index is self.cpu_index else to_gpu(self.cpu_index)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids`` where the type can; returns how many were removed (0 for HNSW)."""
        removed = remove_ids(self.cpu_index, ids)
        if removed and self.index is not self.cpu_index:
            self.index = to_gpu(self.cpu_index)
        return removed

    @property
    def dim(self) -> int:
        return int(self.cpu_index.d)

    def count(self) -> int:
        """Vectors held, removed-but-unremovable (HNSW) ones included."""
        return int(self.cpu_index.ntotal)

    def ids(self) -> np.ndarray | None:
        return stored_ids(self.cpu_index)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (reconstructed: lossy for PQ types)."""
        ivf = self._ivf
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # ids are row ids, not 0..n-1 after deletes
        return self.cpu_index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    def describe(self) -> dict[str, Any]:
        """The manifest entry: backend, factory string, FAISS type, search settings."""
        return {"backend": self.backend, "factory": self.factory, "type": describe(self.cpu_index),
                "search_params": default_search_params(self.cpu_index)}

    def save(self, folder: Path) -> None:
        write(self.cpu_index, Path(folder) / GLOBAL_FILE)


class FaissBackend:
    """Creates and opens :class:`FaissGlobalStore`; specs are FAISS index-factory strings."""

    name = "faiss"
    files = (GLOBAL_FILE,)

    @staticmethod
    def validate(spec: str, dim: int) -> None:
        validate_factory(spec, dim)

    @staticmethod
    def choose(n: int, dim: int, memory_budget_bytes: float) -> str:
        return choose_factory(n, dim, memory_budget_bytes)

    @staticmethod
    def training_size(spec: str, n: int) -> int:
        return training_size(spec, n)

    @staticmethod
    def create(dim: int, spec: str, sample: np.ndarray | Callable[[], np.ndarray], codec: Any = None
               ) -> FaissGlobalStore:
        return FaissGlobalStore(new_index(dim, spec, sample), spec)

    @staticmethod
    def open(folder: Path, entry: dict[str, Any], use_gpu: bool = False, writable: bool = False
             ) -> FaissGlobalStore:
        """The store saved in ``folder`` with the search settings of its manifest ``entry``; memory-mapped
        read-only unless ``writable`` (an update changes it, then saves it under a new file)."""
        path = Path(folder) / GLOBAL_FILE
        if writable:
            index = faiss.read_index(str(path))
        else:
            index = read(path, search_params=entry.get("search_params"))
        return FaissGlobalStore(index, entry.get("factory", ""), use_gpu=use_gpu)


BACKEND = FaissBackend()
