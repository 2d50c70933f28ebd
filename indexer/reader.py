"""Reading inputs: image files (decoded and resized in worker processes, or threads for a model without a
plain preprocessor; batches prefetched); caption files are read by :mod:`models.captions`, the same reader
training uses."""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import threading
import time
import weakref
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from alignsearch.models.captions import CaptionRow, read_caption_rows
from alignsearch.models.preprocess import IMAGE_EXTENSIONS, NEEDS, ImageDecodeError, ImagePreprocessor, load_image

from . import photo_fields

__all__ = ["CaptionRow", "DecodePool", "Decoded", "DecodedBatch", "decode_batches", "feature_batches", "list_images", "read_captions",
           "scan_features", "scan_images", "unread_note"]
WORKER_NICE = 10  # decode processes yield the cores to the encoder whenever it can run
PARENT_CHECK_S = 0.5  # how often a decode process checks that its parent is still there


def scan_images(folder: Path) -> tuple[list[str], Counter[str]]:
    """Image files under ``folder`` (recursive, the formats this install reads) as sorted relative POSIX paths,
    and how many photo files of each format it cannot read (HEIC without its plugin, camera RAW: ``NEEDS``)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder not found: {folder}")
    found, unread = [], Counter()
    for path in folder.rglob("*"):
        suffix = path.suffix.lower()
        if path.name.startswith(".") or not (suffix in IMAGE_EXTENSIONS or suffix in NEEDS) or not path.is_file():
            continue
        if suffix in IMAGE_EXTENSIONS:
            found.append(path.relative_to(folder).as_posix())
        else:
            unread[suffix] += 1
    return sorted(found), unread


def scan_features(folder: Path, captions: Sequence[CaptionRow]) -> list[str]:
    """The image ids of a build from precomputed region features (:mod:`models.precomputed`): the images the
    captions name, whether or not ``folder`` has their features (those without are skipped when read, with the
    reason), and the other images ``folder`` has features for, sorted."""
    from alignsearch.models.precomputed import FeatureFolder  # torch: never imported by the decode processes

    return FeatureFolder(folder).ids_for(r.image for r in captions if r.image)


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive, the formats this install reads), as sorted relative POSIX paths."""
    return scan_images(folder)[0]


def unread_note(unread: Counter[str]) -> str | None:
    """One line on the photo files a scan could not read and what reads them, or None."""
    if not unread:
        return None
    by_need: dict[str, list[tuple[str, int]]] = {}
    for suffix, n in sorted(unread.items()):
        by_need.setdefault(NEEDS[suffix], []).append((suffix, n))
    parts = [", ".join(f"{n} {suffix}" for suffix, n in counts) + f" file{'s' if sum(n for _, n in counts) > 1 else ''}"
             f" ({need})" for need, counts in by_need.items()]
    return "not indexed: " + "; ".join(parts)


@dataclass
class Decoded:
    """One image file read by a worker: its prepared tensor input and size, or why it failed."""

    rel: str
    array: Any = None
    width: int = 0
    height: int = 0
    error: str | None = None
    file: dict[str, list[Any]] | None = None  # what the file says of the photo, read while open (photo_fields)


def feature_batches(folder: Path, batches: Iterable[Sequence[str]], dim: int) -> Iterator[list[Decoded]]:
    """The reader for a model that takes precomputed region features instead of photos: each batch of image
    names read from the features ``folder`` as R x ``dim`` arrays (no width or height); a name without usable
    features is a :class:`Decoded` with its reason. Features of another width raise
    :class:`~models.precomputed.FeaturesError`."""
    from alignsearch.models.precomputed import FeatureFolder  # torch: never imported by the decode processes

    source = FeatureFolder(folder)
    for batch in batches:
        refs, failures = source.resolve(batch, dim)
        reasons = dict(failures)
        yield [Decoded(name, source.read(ref)) if ref is not None else Decoded(name, error=reasons[name])
               for name, ref in zip(batch, refs)]


def _decode(folder: Path, rel: str, read: Callable[[Path], tuple[Any, tuple[int, int]]]) -> Decoded:
    """``read`` one file into (the encoder's input, the image's full width and height), or say why it failed."""
    try:
        array, (width, height) = read(folder / rel)
        return Decoded(rel, array, width, height)
    except (ImageDecodeError, OSError) as exc:
        return Decoded(rel, error=str(exc) or type(exc).__name__)


def _read_prepared(path: Path, prepare: Callable) -> tuple[Any, tuple[int, int]]:
    image = load_image(path)
    return prepare(image), image.size


def _prefetched(batches: Iterable[Sequence[str]], submit: Callable[[Sequence[str]], Any],
                collect: Callable[[Any], list[Decoded]], ahead: int) -> Iterator[list[Decoded]]:
    """Results of each batch in order (``submit`` starts one, ``collect`` waits for what it started), keeping
    ``ahead`` batches in flight beyond the one being consumed."""
    batches = iter(batches)
    pending = deque(submit(batch) for batch in itertools.islice(batches, ahead + 1))
    while pending:
        started = pending.popleft()
        batch = next(batches, None)
        if batch is not None:
            pending.append(submit(batch))
        yield collect(started)


def _in_turns(batches: Iterable[Sequence[str]], submit: Callable[[Sequence[str]], Any],
              collect: Callable[[Any], list[Decoded]], chunk: int) -> Iterator[list[Decoded]]:
    """Results of each batch in order, decoded ``chunk`` batches at a time: a chunk is decoded whole before its
    first batch is handed out, and the next one starts only once the consumer asks past its last, so the
    decoders and the consumer take turns instead of running side by side."""
    batches = iter(batches)
    while group := list(itertools.islice(batches, max(1, chunk))):
        started = [submit(batch) for batch in group]
        yield from [collect(s) for s in started]


def decode_batches(folder: Path, batches: Iterable[Sequence[str]], workers: int, prepare: Callable,
                   prefetch: int = 2) -> Iterator[list[Decoded]]:
    """Decode each batch of relative paths in ``workers`` threads (``prepare`` turns an image into the
    encoder's input), ``prefetch`` batches ahead, so the encoder never waits for file reads or decoding."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        read = functools.partial(_read_prepared, prepare=prepare)
        yield from _prefetched(batches, lambda batch: [pool.submit(_decode, folder, rel, read) for rel in batch],
                               lambda futures: [f.result() for f in futures], prefetch)


_WORKER_PREPROCESSOR: ImagePreprocessor | None = None


def _start_worker(preprocessor: ImagePreprocessor, nice: int, parent: int) -> None:
    global _WORKER_PREPROCESSOR
    _WORKER_PREPROCESSOR = preprocessor
    os.nice(nice)
    threading.Thread(target=_exit_without, args=(parent,), name="alignsearch-parent-watch", daemon=True).start()


def _exit_without(parent: int) -> None:
    """End this decode process once the process that started it is gone (killed, or ended at once after
    Ctrl-C): a worker waiting for work never notices by itself, and would idle on forever."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _decode_resized(folder: Path, rel: str) -> Decoded:
    """One file read as the build reads it: decoded and resized for the pool's preprocessor, and its file's
    facts (modification time, EXIF capture date) taken while it is open."""
    assert _WORKER_PREPROCESSOR is not None
    path = folder / rel
    try:
        array, (width, height), exif = _WORKER_PREPROCESSOR.read_file(path)
    except (ImageDecodeError, OSError) as exc:
        return Decoded(rel, error=str(exc) or type(exc).__name__)
    return Decoded(rel, array, width, height, file=photo_fields.read_file_facts(path, exif))


def _decode_chunk(folder: Path, rels: Sequence[str]) -> tuple[list[Decoded], Any]:
    """A chunk of files decoded in one task: their :class:`Decoded` without arrays, and the arrays of those
    that decoded stacked in one uint8 array (one message back, one copy, instead of one per photo)."""
    decoded = [_decode_resized(folder, rel) for rel in rels]
    good = [d.array for d in decoded if d.error is None]
    for d in decoded:
        d.array = None
    return decoded, (np.stack(good) if good else None)


def _unpack(future: Future) -> "DecodedBatch":
    decoded, stacked = future.result()
    good = [d for d in decoded if d.error is None]
    for n, d in enumerate(good):
        d.array = stacked[n]
    return DecodedBatch(decoded, stacked)


class DecodedBatch(list):
    """A batch of :class:`Decoded` (a list) whose decoded arrays also lie stacked in ``pixels`` (n_good x size x
    size x 3, uint8, in order; each ``array`` is a view of its row), ready for the encoder without a copy."""

    def __init__(self, items: Iterable[Decoded], pixels: Any) -> None:
        super().__init__(items)
        self.pixels = pixels


class DecodePool:
    """Worker processes that read, decode and resize image files to uint8 arrays for ``preprocessor``
    (:meth:`ImagePreprocessor.load_file`: a large JPEG decoded at a reduced scale); the encoder's process only
    normalises them, in one vectorised step.

    The processes start on first use (``spawn``: no forked copy of the model or of its threads), run at a
    lower priority (``nice``) so the encoder keeps its cores whenever it can run, and stop on :meth:`close`,
    when the pool is collected, or when this process is gone however it ended."""

    def __init__(self, workers: int, preprocessor: ImagePreprocessor, nice: int = WORKER_NICE) -> None:
        self.workers = max(1, min(workers, os.cpu_count() or 1))
        self.preprocessor = preprocessor
        self.nice = nice
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is not None and getattr(self._executor, "_broken", False):
            self._executor.shutdown(wait=False, cancel_futures=True)  # a worker died: start afresh
            self._executor = None
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_worker,
                                                 initargs=(self.preprocessor, self.nice, os.getpid()))
            weakref.finalize(self, self._executor.shutdown, wait=True, cancel_futures=True)
        return self._executor

    def batches(self, folder: Path, batches: Iterable[Sequence[str]], prefetch: int = 2,
                turns: int = 0) -> Iterator[DecodedBatch]:
        """Each batch of relative paths as :class:`Decoded` with uint8 ``array`` (size x size x 3), in order, as a
        :class:`DecodedBatch` (the arrays also stacked). Each batch is one task of a decode process.

        ``turns`` 0: at least ``prefetch`` batches, and two per process, are decoded while the consumer works on
        the current one (the encoder on a GPU). ``turns`` N: N batches at a time, decoded on every core while the
        consumer waits, then handed out while no decoder runs (an encoder on the same CPU cores, whose threads
        stall at their barriers when a decoder takes a core from one of them)."""
        pool = self._pool()
        submit = lambda batch: pool.submit(_decode_chunk, folder, list(batch))  # noqa: E731
        if turns > 0:
            yield from _in_turns(batches, submit, _unpack, turns)
        else:
            yield from _prefetched(batches, submit, _unpack, max(prefetch, 2 * self.workers))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def read_captions(path: Path) -> list[CaptionRow]:
    """Captions to index (empty ones kept: the build skips them with a reason)."""
    return read_caption_rows(path)
