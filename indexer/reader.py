"""Reading inputs: image files (decoded in worker threads, batches prefetched) and caption files."""

from __future__ import annotations

import csv
import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from models.data import DatasetError, load_dataset
from models.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, load_image


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


def decoded_batches(folder: Path, files: Sequence[str], batch_size: int, workers: int,
                    prepare: Callable, prefetch: int = 2) -> Iterator[list[Decoded]]:
    """Decode ``files`` in ``workers`` threads, ``prefetch`` batches ahead of the consumer."""
    batches = (list(files[start : start + batch_size]) for start in range(0, len(files), batch_size))
    return decode_batches(folder, batches, workers, prepare, prefetch)


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


@dataclass
class CaptionRow:
    text: str
    image: str | None
    extra: dict[str, Any] = field(default_factory=dict)


def read_captions(path: Path) -> list[CaptionRow]:
    """Captions from an ``image,caption`` CSV (other columns kept as metadata), JSON lines
    (``caption`` required, ``image`` optional), or a Karpathy JSON. Empty captions are kept (and skipped with a
    report by the build)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "caption" not in reader.fieldnames:
                raise DatasetError(f"{path}: a caption CSV needs a 'caption' column (and 'image')")
            return [
                CaptionRow((row.get("caption") or "").strip(), (row.get("image") or "").strip() or None,
                           {k: v for k, v in row.items() if k not in ("image", "caption") and k is not None})
                for row in reader
            ]
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = str(obj["caption"]).strip()
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DatasetError(f"{path}:{n}: expected a JSON object with 'caption'") from exc
            rows.append(CaptionRow(text, obj.get("image") or None,
                                   {k: v for k, v in obj.items() if k not in ("image", "caption")}))
        return rows
    return [CaptionRow(c, r.filename, {"split": r.split}) for r in load_dataset(path) for c in r.captions]
