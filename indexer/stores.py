"""The two stores of a collection, as interfaces, and the registry of their backends.

A collection (images or captions) keeps its items in two stores:

- a **global store** (first stage): one vector per item, searched by inner product; ids are row ids;
- a **local store** (rerank): the per-region / per-word vectors of every item, gathered for K candidates.

FAISS (:mod:`indexer.faiss_index`) and FAISS standalone codecs over memory-mapped files
(:mod:`indexer.local_store`) are the default implementations; Qdrant (:mod:`indexer.qdrant_store`) keeps both
stores of a collection in one Qdrant collection. Another backend implements the protocols below and adds one
entry to :data:`GLOBAL_BACKENDS` or :data:`LOCAL_BACKENDS`; the manifest records which backend each collection
uses (``"backend"`` and ``"local_backend"``; indexes written before these fields use the FAISS ones). A build
may pass a configured backend object instead of a name (``--store qdrant`` with its connection). Nothing
outside the backends' own modules imports FAISS or Qdrant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch

from . import faiss_index, local_store, qdrant_store
from .layout import IndexError_


class GlobalStore(Protocol):
    """One vector per item; ids are the metadata's row ids."""

    backend: str

    @property
    def real_deletes(self) -> bool:
        """True when :meth:`remove` takes items out; False when removed ids stay (tombstones skip them)."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each n x k, best first; id -1 pads when fewer than k items exist."""

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids`` if the store can; returns how many it removed."""

    def count(self) -> int:
        """Vectors held (removed-but-kept ones included)."""

    def ids(self) -> np.ndarray | None:
        """The ids held, sorted, or None when the store cannot list them."""

    def describe(self) -> dict[str, Any]:
        """The store's manifest entry (``backend`` and what :meth:`GlobalBackend.open` needs)."""

    def save(self, folder: Path) -> None:
        """Write the store's files into ``folder`` (each to a temp name, then renamed)."""


class GlobalBackend(Protocol):
    """Creates and opens global stores; a ``spec`` says which kind (for FAISS, an index-factory string)."""

    name: str
    files: tuple[str, ...]  # the data files it writes in a collection folder

    def validate(self, spec: str, dim: int) -> None:
        """Raise ValueError naming the problem when ``spec`` is unusable."""

    def choose(self, n: int, dim: int, memory_budget_bytes: float) -> str:
        """A spec for ``n`` vectors of ``dim`` floats within the budget."""

    def training_size(self, spec: str, n: int) -> int:
        """How many of ``n`` vectors to sample for training (0: no training)."""

    def create(self, dim: int, spec: str, sample: np.ndarray | Callable[[], np.ndarray],
               codec: Any = None) -> GlobalStore:
        """An empty store, trained on ``sample`` (or its result) when the spec needs training. ``codec`` is the
        collection's local codec: a backend that keeps both stores in one place (Qdrant) writes where it says."""

    def open(self, folder: Path, entry: dict[str, Any], use_gpu: bool = False,
             writable: bool = False) -> GlobalStore: ...


class LocalStore(Protocol):
    """Read side of the per-token vectors of a collection."""

    backend: str
    codec: Any  # what encodes new vectors like the stored ones (passed back to LocalBackend.write)

    def __len__(self) -> int: ...

    @property
    def dim(self) -> int: ...

    @property
    def code_size(self) -> int:
        """Bytes per stored vector."""

    @property
    def total_vectors(self) -> int: ...

    @property
    def nbytes(self) -> int:
        """Bytes the items' vectors take in the store."""

    def lengths(self) -> np.ndarray:
        """Tokens per item."""

    def check(self, dim: int | None = None) -> list[str]:
        """Internal inconsistencies found, each naming its file (dtypes, shapes, offsets; vectors of ``dim``)."""

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The vectors of ``rows``: (K x T x D float32, K x T bool mask)."""


class LocalBackend(Protocol):
    """Writes and opens local stores; a ``spec`` names the codec (for FAISS codecs a factory string)."""

    name: str
    files: tuple[str, ...]

    def validate(self, spec: str, dim: int) -> None: ...

    def spec_for(self, spec: str, collection: str, regions: int | None = None, dim: int = 384) -> str:
        """The spec ``collection``'s store uses when the index is built with ``spec`` (a preset may name one
        codec per collection, and size it for ``regions`` per item of ``dim`` when they are known)."""

    def make_codec(self, dim: int, spec: str, sample: np.ndarray) -> Any:
        """The codec, trained on ``sample`` when it needs training."""

    def write(self, folder: Path, codec: Any, parts: Iterable[np.ndarray], lengths: np.ndarray,
              previous: LocalStore | None = None) -> None:
        """Write ``previous``'s items followed by ``parts`` (float vectors, items back to back; ``lengths``
        tokens each) without holding them all in memory."""

    def open(self, folder: Path) -> LocalStore: ...


DEFAULT_GLOBAL = "faiss"
DEFAULT_LOCAL = "faiss-codec"
GLOBAL_BACKENDS: dict[str, GlobalBackend] = {faiss_index.BACKEND.name: faiss_index.BACKEND,
                                              qdrant_store.NAME: qdrant_store.GLOBAL_BACKEND}
LOCAL_BACKENDS: dict[str, LocalBackend] = {local_store.BACKEND.name: local_store.BACKEND,
                                           qdrant_store.NAME: qdrant_store.LOCAL_BACKEND}


def global_backend(name: str | GlobalBackend | None = None) -> GlobalBackend:
    """The global backend called ``name`` (``None``: the default, as in manifests that predate the field); a
    backend object is returned as it is."""
    if name is not None and not isinstance(name, str):
        return name
    return _lookup(GLOBAL_BACKENDS, name or DEFAULT_GLOBAL, "global")


def local_backend(name: str | LocalBackend | None = None) -> LocalBackend:
    if name is not None and not isinstance(name, str):
        return name
    return _lookup(LOCAL_BACKENDS, name or DEFAULT_LOCAL, "local")


def _lookup(table: dict[str, Any], name: str, kind: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise IndexError_(f"unknown {kind} store backend {name!r} (known: {sorted(table)})") from None

