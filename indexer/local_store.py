"""Per-region / per-word vectors in FAISS's own standalone codecs, memory-mapped.

A codec from a factory string (``SQfp16`` default, ``SQ8``, ``PQ{m}``, ``OPQ{m},PQ{m}``, ...) turns each vector into
a fixed number of bytes with ``sa_encode``; a preset (:data:`PRESETS`, e.g. ``compact``) names one factory string
per collection. Codes of all items lie back to back in one uint8 array (``codes.npy``, opened with
``mmap_mode='r'``); ``offsets.npy`` says where each item starts. A query's K candidates are gathered and
decoded in one ``sa_decode`` call, so the cost is K items' bytes, not the collection's. Their pages are asked for
all at once first (:meth:`LocalStore.prefetch`), so a cold gather is one round of parallel reads.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import faiss
import numpy as np
import torch

from .layout import CODEC_FILE, CODES_FILE, COLLECTIONS, OFFSETS_FILE, atomic_path

TRAIN_SAMPLE = 65_536
COPY_CHUNK = 262_144  # vectors encoded / codes copied per step while writing a store

PRESETS: dict[str, dict[str, str]] = {
    # chosen on the validation images (docs/design.md, "Compact local store"): region codes <= 4 kB per photo within 1 rsum of
    # SQfp16; the caption side keeps SQfp16, where the word vectors lose most to PQ (image-to-text recall).
    # PQ64 is for 49 regions; a photo with more regions gets fewer bytes per region (compact_pq)
    "compact": {"images": "PQ64", "captions": "SQfp16"},
}
COMPACT_BYTES_PER_PHOTO = 4096  # the compact preset's budget for one photo's region codes
PQ_SIZES = (64, 48, 32, 24, 16, 8)  # bytes per region the compact preset picks from (divisors of 384)


def compact_pq(regions: int, dim: int) -> str:
    """The compact preset's photo codec for ``regions`` regions per photo: the largest PQ of :data:`PQ_SIZES`
    (dividing ``dim``) whose codes fit :data:`COMPACT_BYTES_PER_PHOTO` (49 regions: PQ64; 81: PQ48)."""
    for m in PQ_SIZES:
        if dim % m == 0 and regions * m <= COMPACT_BYTES_PER_PHOTO:
            return f"PQ{m}"
    return f"PQ{PQ_SIZES[-1]}"


def collection_spec(spec: str, collection: str, regions: int | None = None, dim: int = 384) -> str:
    """The factory string ``spec`` gives ``collection`` (``images`` / ``captions``): a preset's entry for it
    (the compact preset's photo codec sized for ``regions`` per photo, when known), otherwise ``spec`` itself
    (one codec for both)."""
    if spec not in PRESETS:
        return spec
    if spec == "compact" and collection == "images" and regions:
        return compact_pq(regions, dim)
    return PRESETS[spec][collection]


def make_codec(dim: int, factory: str, sample: np.ndarray, train: bool = True) -> faiss.Index:
    """A standalone codec for ``dim``-d vectors, trained on ``sample`` when the type needs training."""
    try:
        codec = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"invalid local codec factory string {factory!r}: {str(exc).splitlines()[0]}") from exc
    inner = faiss.downcast_index(codec)
    if isinstance(inner, faiss.IndexPQ):
        inner.do_polysemous_training = False  # only sa_encode / sa_decode are used: skip the costly reordering
        inner.pq.cp.min_points_per_centroid = 1  # small collections: train on what there is, without warnings
    if train and not codec.is_trained:
        if len(sample) < 256:
            sample = np.concatenate([sample] * (256 // max(len(sample), 1) + 1)) if len(sample) else sample
        if len(sample) == 0:
            raise ValueError(f"codec {factory!r} needs training vectors")
        rng = np.random.default_rng(0)
        if len(sample) > TRAIN_SAMPLE:
            sample = sample[rng.choice(len(sample), TRAIN_SAMPLE, replace=False)]
        codec.train(np.ascontiguousarray(sample, dtype=np.float32))
    return codec


def encode(codec: faiss.Index, vectors: np.ndarray, device: str | torch.device | None = None) -> np.ndarray:
    """n x d float vectors -> n x code_size uint8 codes.

    A plain 8-bit PQ codec encodes on ``device`` (default: the GPU when there is one) by matrix products
    (:func:`pq_encode`), and without a device by a flat search per sub-quantizer (:func:`pq_encode_by_search`);
    both are far faster than ``sa_encode``'s per-vector loop (about 13k vectors/s per core here, so 1M photos' 49M
    region vectors took most of an hour on 2 cores). Other codecs use FAISS's ``sa_encode``."""
    if len(vectors) == 0:
        return np.zeros((0, codec.sa_code_size()), dtype=np.uint8)
    if vectors.dtype == np.float16 and is_fp16_codec(codec):  # the codes are the half floats' bytes: no pass
        return np.ascontiguousarray(vectors).view(np.uint8)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else None
    inner = faiss.downcast_index(codec)
    if isinstance(inner, faiss.IndexPQ) and inner.pq.nbits == 8:
        if device is None:
            return pq_encode_by_search(inner.pq, vectors)
        return pq_encode(inner.pq, vectors, torch.device(device))
    return codec.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32))


def is_fp16_codec(codec: faiss.Index) -> bool:
    """Whether ``codec`` is FAISS's ``SQfp16``, whose code of a vector is its IEEE half floats, little-endian:
    ``sa_encode`` of float16 values gives their own bytes (tested for every finite half), so float16 vectors
    are their codes as they are."""
    inner = faiss.downcast_index(codec)
    return (isinstance(inner, faiss.IndexScalarQuantizer) and inner.sq.qtype == faiss.ScalarQuantizer.QT_fp16
            and np.little_endian)


def pq_encode_by_search(pq: faiss.ProductQuantizer, vectors: np.ndarray) -> np.ndarray:
    """FAISS's PQ codes on the CPU through ``compute_codes_with_assign_index``: for each sub-quantizer, one
    exhaustive flat search of all sub-vectors among its centroids (blocked, BLAS), instead of a distance table per
    vector: 217k vectors/s against 26k for ``sa_encode`` (PQ64 on 384-d, 2 cores). Equal to ``sa_encode`` but for
    exact ties. Works on a copy of ``pq``, so a codec shared between threads is never changed."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    local = faiss.ProductQuantizer(pq.d, pq.M, pq.nbits)
    faiss.copy_array_to_vector(faiss.vector_to_array(pq.centroids), local.centroids)
    assign = faiss.IndexFlatL2(pq.dsub)  # kept referenced here: the quantizer does not own it
    local.assign_index = assign
    codes = np.empty((len(x), pq.code_size), dtype=np.uint8)
    local.compute_codes_with_assign_index(faiss.swig_ptr(x), faiss.swig_ptr(codes), len(x))
    return codes


def pq_centroids(pq: faiss.ProductQuantizer) -> np.ndarray:
    """A product quantizer's centroids as M x ksub x dsub float32 (code byte m of a vector picks row m, code)."""
    return faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)


def pq_encode(pq: faiss.ProductQuantizer, vectors: np.ndarray, device: torch.device, chunk: int = 65_536
              ) -> np.ndarray:
    """FAISS's PQ codes computed with matrix products on ``device``: each sub-vector's nearest centroid by
    ``|c|^2 - 2 x.c`` (the ``|x|^2`` term is the same for every centroid). Equal to ``sa_encode`` but for exact
    ties between two centroids' distances, which float rounding may break the other way."""
    centroids = torch.from_numpy(pq_centroids(pq)).to(device)
    norms = (centroids * centroids).sum(-1)  # M x ksub
    out = np.empty((len(vectors), pq.M), dtype=np.uint8)
    for start in range(0, len(vectors), chunk):
        x = torch.as_tensor(np.asarray(vectors[start : start + chunk], dtype=np.float32)).to(device)
        x = x.view(len(x), pq.M, pq.dsub).transpose(0, 1)  # M x n x dsub
        distances = norms[:, None, :] - 2 * torch.bmm(x, centroids.transpose(1, 2))  # M x n x ksub
        out[start : start + len(x[0])] = distances.argmin(-1).T.to(torch.uint8).cpu().numpy()
    return out


def write_store(folder: Path, codec: faiss.Index, codes: np.ndarray, lengths: np.ndarray) -> None:
    """Write the codec, the codes and the offsets of a collection (items' token counts in ``lengths``)."""
    write_store_streaming(folder, codec, [codes], lengths, encoded=True)


def write_store_streaming(folder: Path, codec: faiss.Index, parts: Iterable[np.ndarray], lengths: np.ndarray,
                          previous: "LocalStore | None" = None, encoded: bool = False) -> None:
    """Write a collection's store without holding it in memory: the codes of ``previous`` (copied by the kernel,
    :func:`_append_codes`) followed by ``parts`` (float vectors, encoded here, or codes when ``encoded``), into
    ``codes.npy``. ``lengths`` are the token counts of the new items. Every file is written to a temp name and
    renamed, so a live index sharing these files (hard links) is never changed."""
    folder.mkdir(parents=True, exist_ok=True)
    lengths = np.asarray(lengths, dtype=np.int64)
    start = 0 if previous is None else len(previous.codes)
    total = start + int(lengths.sum())
    with atomic_path(folder / CODES_FILE) as tmp, open(tmp, "wb") as fh:
        # plain writes, not a memory map: a full disk is an OSError (ENOSPC) here, not a SIGBUS later
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                  "fortran_order": False, "shape": (total, codec.sa_code_size())})
        if previous is not None:
            _append_codes(fh, previous.codes, start)
        pos = start
        for part in parts:
            for first in range(0, len(part), COPY_CHUNK):
                chunk = part[first : first + COPY_CHUNK]
                codes = chunk if encoded else encode(codec, chunk)
                fh.write(np.ascontiguousarray(codes, dtype=np.uint8).data)
                pos += len(codes)
        if pos != total:
            raise RuntimeError(f"{folder}: {pos} local vectors written, {total} expected from the lengths")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if previous is not None:
        offsets = np.concatenate([previous.offsets[:-1], offsets + start])
    with atomic_path(folder / OFFSETS_FILE) as tmp, open(tmp, "wb") as fh:
        np.save(fh, offsets)
    with atomic_path(folder / CODEC_FILE) as tmp:
        faiss.write_index(codec, str(tmp))


def _append_codes(fh: BinaryIO, codes: np.ndarray, count: int) -> None:
    """Append the first ``count`` rows of ``codes`` to ``fh``. From a file's memory map (``np.load(mmap_mode=...)``)
    the kernel copies them (``os.copy_file_range``), so the bytes never pass through this process's memory: adding
    10 photos to a 1M-photo index peaked at 3.9 GB RSS instead of 5.5 GB, in the same time on this machine's ext4
    (a file system with reflinks, XFS or btrfs, may share the blocks instead of copying them). Where the kernel
    refuses (an old kernel across file systems, for one), and for codes in memory, they are copied in chunks."""
    total = count * codes.shape[1]
    source = codes.filename if isinstance(codes, np.memmap) else None
    if source and total and hasattr(os, "copy_file_range"):
        fh.flush()
        start, done = fh.tell(), 0
        try:
            with open(source, "rb") as src:
                while done < total:
                    moved = os.copy_file_range(src.fileno(), fh.fileno(), total - done, codes.offset + done,
                                               start + done)
                    if moved == 0:
                        raise OSError(errno.EIO, f"{source} ended {total - done} bytes early")
                    done += moved
            fh.seek(start + done)
            return
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk stays a full disk
                raise
            fh.seek(start)
            fh.truncate()
    for pos in range(0, count, COPY_CHUNK):
        fh.write(np.ascontiguousarray(codes[pos : min(count, pos + COPY_CHUNK)]).data)


@dataclass
class LocalStore:
    """Read side: memory-mapped codes, per-item offsets, and the codec to decode them."""

    codec: faiss.Index
    codes: np.ndarray
    offsets: np.ndarray
    backend = "faiss-codec"
    files = (CODEC_FILE, CODES_FILE, OFFSETS_FILE)

    def __post_init__(self) -> None:
        codec = faiss.downcast_index(self.codec)
        # SQfp16 codes are IEEE half floats: reading them as float16 gives sa_decode's exact result, faster
        self.fp16 = isinstance(codec, faiss.IndexScalarQuantizer) and codec.sq.qtype == faiss.ScalarQuantizer.QT_fp16
        self._tables: dict[str, torch.Tensor] = {}
        self._pq_table: np.ndarray | None = None
        self._mapping, self._mapped_at = _mapping_of(self.codes)
        if isinstance(codec, faiss.IndexPQ) and codec.pq.nbits == 8:
            # a plain PQ decode is a table lookup: (M * 256) x dsub centroids, one row per code byte
            self._pq_table = pq_centroids(codec.pq).reshape(-1, codec.pq.dsub)

    @property
    def decodes_on_device(self) -> bool:
        """Whether :meth:`decode_tensor` can decode on the device that holds the codes (plain 8-bit PQ codecs)."""
        return self._pq_table is not None

    def decode_tensor(self, codes: torch.Tensor) -> torch.Tensor:
        """n x code_size uint8 codes on any device -> n x dim float32 vectors there, equal to :meth:`decode`: the
        PQ centroid table gathered where the codes are (a GPU decodes the bytes it was sent, the CPU is spared)."""
        if self._pq_table is None:
            raise TypeError("this codec has no device decoder (decodes_on_device is False)")
        key = str(codes.device)
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(self._pq_table).to(codes.device)
        m = codes.shape[1]
        rows = codes.long() + torch.arange(m, device=codes.device) * (len(self._pq_table) // m)
        return self._tables[key][rows.view(-1)].view(len(codes), -1)

    @functools.cached_property
    def codes_tensor(self) -> torch.Tensor:
        """The codes as a tensor over the same memory map, no copy: torch's row gather (``index_select``) is about
        2x faster than numpy's on these rows. Read-only memory that torch never writes here, so its warning about
        a non-writable array is silenced for this one view."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(self.codes)

    def decode(self, codes: np.ndarray) -> torch.Tensor:
        """n x code_size codes -> n x dim float32 vectors (one ``sa_decode`` call)."""
        if self.fp16:
            return torch.from_numpy(np.ascontiguousarray(codes).view(np.float16)).float()
        return torch.from_numpy(self.codec.sa_decode(np.ascontiguousarray(codes)))

    @classmethod
    def open(cls, folder: Path) -> "LocalStore":
        return cls(
            faiss.read_index(str(folder / CODEC_FILE)),
            np.load(folder / CODES_FILE, mmap_mode="r"),
            np.load(folder / OFFSETS_FILE),
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def dim(self) -> int:
        return self.codec.d

    @property
    def code_size(self) -> int:
        """Bytes per local vector."""
        return int(self.codec.sa_code_size())

    @property
    def total_vectors(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        """Bytes the items take (codes and offsets; the codec itself not counted)."""
        return int(self.codes.nbytes + self.offsets.nbytes)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def check(self, dim: int | None = None) -> list[str]:
        """What is wrong with the arrays, each naming its file: dtypes and shapes, offsets that start at 0,
        never decrease and end at the number of codes, codes as wide as the codec's, the codec's dimension
        (``dim``). Reads the offsets once (8 bytes per item), never the codes."""
        problems = []
        codes, offsets = self.codes, self.offsets
        if dim is not None and self.codec.d != dim:
            problems.append(f"{CODEC_FILE}: a codec of {self.codec.d}-d vectors, the model's are {dim}-d")
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.code_size:
            problems.append(f"{CODES_FILE}: {codes.dtype} array of shape {codes.shape}, expected uint8 of shape "
                            f"(n, {self.code_size})")
        if offsets.dtype != np.int64 or offsets.ndim != 1 or len(offsets) < 1:
            return problems + [f"{OFFSETS_FILE}: {offsets.dtype} array of shape {offsets.shape}, expected int64 "
                               f"of shape (items + 1,)"]
        if int(offsets[0]) != 0 or bool(np.any(offsets[1:] < offsets[:-1])):
            problems.append(f"{OFFSETS_FILE}: offsets do not start at 0 and increase")
        if int(offsets[-1]) != len(codes):
            problems.append(f"{OFFSETS_FILE}: offsets end at {int(offsets[-1])}, {CODES_FILE} has {len(codes)} codes")
        return problems

    def prefetch(self, rows: np.ndarray) -> None:
        """Ask the kernel to read the codes of ``rows`` now, all in one go (``MADV_WILLNEED`` on their pages,
        neighbours merged), so that a cold gather waits for one round of parallel reads instead of one page
        fault per item, each of which also reads ahead up to the disk's read-ahead window (8 MB on this
        machine's disk): 100 cold candidates of a 3 GB store took 443 ms that way, 1.1 ms after this. A hint:
        does nothing where the codes are not a memory map or the platform has no ``madvise``."""
        if self._mapping is None or len(rows) == 0:
            return
        for first, end in self.cold_page_ranges(rows):
            try:
                self._mapping.madvise(mmap.MADV_WILLNEED, int(first), int(end - first))
            except OSError:  # a hint the kernel refused: the gather reads the pages itself
                return

    def page_ranges(self, rows: np.ndarray) -> list[tuple[int, int]]:
        """The byte ranges of the memory map that hold the codes of ``rows``, each start rounded down to its
        page, sorted and merged."""
        rows = np.asarray(rows, dtype=np.int64)
        size = self.codes.shape[1]  # bytes per vector
        starts = self._mapped_at + self.offsets[rows] * size
        ends = self._mapped_at + self.offsets[rows + 1] * size
        return merged_ranges(starts // mmap.PAGESIZE * mmap.PAGESIZE, ends)

    def cold_page_ranges(self, rows: np.ndarray) -> list[tuple[int, int]]:
        """Those of :meth:`page_ranges` that have a page outside the page cache (:func:`cold_ranges`): what
        :meth:`prefetch` asks the kernel for."""
        base = self.codes.ctypes.data - self._mapped_at  # the mapping's first byte (page-aligned)
        return cold_ranges(base, self.page_ranges(rows))

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode the vectors of ``rows`` in one call: (K x T x D float32, K x T bool mask)."""
        rows = np.asarray(rows, dtype=np.int64)
        self.prefetch(rows)
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lengths = ends - starts
        width = int(lengths.max()) if len(rows) else 0
        if width == 0:
            return torch.zeros(len(rows), 0, self.dim), torch.zeros(len(rows), 0, dtype=torch.bool)
        if int(lengths.min()) == width:  # every item has the same token count (image grids): no padding
            codes = self.codes[(starts[:, None] + np.arange(width)[None, :]).ravel()]
            flat = self.decode(codes).reshape(len(rows), width, self.dim)
            return flat, torch.ones(len(rows), width, dtype=torch.bool)
        codes = np.concatenate([self.codes[s:e] for s, e in zip(starts, ends)])
        mask = torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])
        out = torch.zeros((len(rows), width, self.dim), dtype=torch.float32)
        out[mask] = self.decode(codes)
        return out, mask


def _mapping_of(codes: np.ndarray) -> tuple[mmap.mmap | None, int]:
    """The memory map under ``codes`` (from ``np.load(mmap_mode=...)``) and where in it the codes start; (None,
    0) when the codes are in memory or the platform has no ``madvise``."""
    mapping = codes.base if isinstance(codes, np.memmap) else None
    if not isinstance(mapping, mmap.mmap) or not hasattr(mapping, "madvise") or codes.size == 0:
        return None, 0
    return mapping, codes.ctypes.data - np.frombuffer(mapping, dtype=np.uint8).ctypes.data


MINCORE_MAX_PAGES = 1 << 20  # residency asked for at most this many pages (4 GB of span) at once: ~0.3 ms


@functools.lru_cache(maxsize=1)
def _mincore() -> Callable[..., int] | None:
    """libc's ``mincore`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p], ctypes.c_int
    return fn


def resident(address: int, length: int) -> np.ndarray | None:
    """For each page of the mapped memory ``[address, address + length)`` (``address`` page-aligned), whether it
    is in the page cache (``mincore``); None where that cannot be asked (not Linux, or the call failed)."""
    mincore = _mincore()
    if mincore is None:
        return None
    vec = np.empty(-(-length // mmap.PAGESIZE), dtype=np.uint8)
    if length and mincore(address, length, vec.ctypes.data) != 0:
        return None
    return (vec & 1).astype(bool)


def cold_ranges(base: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The byte ranges of a mapping at address ``base`` (page-aligned starts, sorted) that have a page outside
    the page cache, by one ``mincore`` over their span: on a warm store none, so a batch makes no ``madvise``
    call at all (one per range cost 1.1 ms of a 16-query rerank's 10 ms on a warm 10k-photo store). Every range
    where residency cannot be asked (a span over :data:`MINCORE_MAX_PAGES`, or :func:`resident` cannot)."""
    if not ranges:
        return ranges
    lo, hi = ranges[0][0], max(end for _, end in ranges)
    pages = resident(base + lo, hi - lo) if hi - lo <= MINCORE_MAX_PAGES * mmap.PAGESIZE else None
    if pages is None:
        return ranges
    bounds = np.array(ranges, dtype=np.int64)
    first, last = (bounds[:, 0] - lo) // mmap.PAGESIZE, (bounds[:, 1] - 1 - lo) // mmap.PAGESIZE
    missing = np.concatenate(([0], np.cumsum(~pages)))  # cold pages before each page
    cold = missing[last + 1] > missing[first]
    return [r for r, c in zip(ranges, cold.tolist()) if c]


def merged_ranges(starts: np.ndarray, ends: np.ndarray) -> list[tuple[int, int]]:
    """The byte ranges ``[starts[i], ends[i])`` sorted, with overlapping or touching ones merged."""
    if len(starts) == 0:
        return []
    if len(starts) > 1 and not bool((starts[1:] >= starts[:-1]).all()):  # a rerank's union comes sorted
        order = np.argsort(starts, kind="stable")
        starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    breaks = np.flatnonzero(starts[1:] > reach[:-1]) + 1
    opens = np.concatenate(([0], breaks))
    closes = np.concatenate((breaks - 1, [len(starts) - 1]))
    return list(zip(starts[opens].tolist(), reach[closes].tolist()))


class CodecBackend:
    """Writes and opens :class:`LocalStore`; specs are FAISS standalone-codec factory strings."""

    name = "faiss-codec"
    files = (CODEC_FILE, CODES_FILE, OFFSETS_FILE)

    @staticmethod
    def validate(spec: str, dim: int) -> None:
        for factory in sorted({collection_spec(spec, name) for name in COLLECTIONS}):
            make_codec(dim, factory, np.zeros((0, dim), np.float32), train=False)

    @staticmethod
    def spec_for(spec: str, collection: str, regions: int | None = None, dim: int = 384) -> str:
        return collection_spec(spec, collection, regions, dim)

    @staticmethod
    def make_codec(dim: int, spec: str, sample: np.ndarray) -> faiss.Index:
        """Trained on ``sample``; left untrained when it is empty (nothing to store yet)."""
        return make_codec(dim, spec, sample, train=len(sample) > 0)

    @staticmethod
    def write(folder: Path, codec: faiss.Index, parts: Iterable[np.ndarray], lengths: np.ndarray,
              previous: LocalStore | None = None) -> None:
        write_store_streaming(folder, codec, parts, lengths, previous=previous)

    @staticmethod
    def open(folder: Path) -> LocalStore:
        return LocalStore.open(folder)


BACKEND = CodecBackend()
