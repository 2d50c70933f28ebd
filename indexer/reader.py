"""Reading inputs: image files (decoded in worker threads, batches prefetched); caption files are read by
:mod:`models.captions`, the same reader training uses."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from alignsearch.models.captions import CaptionRow, read_caption_rows
from alignsearch.models.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, load_image

__all__ = ["CaptionRow", "Decoded", "decode_batches", "list_images", "read_captions"]


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive, common formats), as sorted relative POSIX paths."""
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder not found: {folder}")
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


@dataclass
class Decoded:
    """One image file read by a worker: its prepared tensor input and size, or why it failed."""

    rel: str
    array: Any = None
    width: int = 0
    height: int = 0
    error: str | None = None


def _decode(folder: Path, rel: str, prepare: Callable) -> Decoded:
    try:
        image = load_image(folder / rel)
        return Decoded(rel, prepare(image), image.width, image.height)
    except (ImageDecodeError, OSError) as exc:
        return Decoded(rel, error=str(exc) or type(exc).__name__)


def decode_batches(folder: Path, batches: Iterable[Sequence[str]], workers: int, prepare: Callable,
                   prefetch: int = 2) -> Iterator[list[Decoded]]:
    """Decode each batch of relative paths in ``workers`` threads, keeping ``prefetch`` batches in flight
    beyond the one being consumed, so the encoder never waits for file reads or image decoding."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque[list[Future]] = deque()
        batches = iter(batches)

        def submit() -> None:
            batch = next(batches, None)
            if batch is not None:
                pending.append([pool.submit(_decode, folder, rel, prepare) for rel in batch])

        for _ in range(prefetch + 1):
            submit()
        while pending:
            batch = pending.popleft()
            submit()
            yield [f.result() for f in batch]


def read_captions(path: Path) -> list[CaptionRow]:
    """Captions to index (empty ones kept: the build skips them with a reason)."""
    return read_caption_rows(path)
