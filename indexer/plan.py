"""Planning a build: the inputs cut into shard tasks, plain data that any worker can run.

A task names its collection, its number (its shard's name) and its items: for images, file paths relative
to ``folder`` (stored relative to ``root``, the index's images root, when they lie under it); for captions,
the caption items the id policy produced (:mod:`indexer.caption_ids`). Tasks are JSON-serialisable (no
model, no open files), so a distributor may send them to other processes or machines.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CAPTION_SHARD_FACTOR = 4  # captions are smaller than images: four times as many per shard


@dataclass(frozen=True)
class ShardTask:
    collection: str
    number: int
    items: list[Any]
    skipped: list[dict[str, str]] = field(default_factory=list)  # known before encoding (captions)
    folder: str | None = None  # images: where the files are read from
    root: str | None = None  # images: paths under it are stored relative to it

    def stored_path(self, rel: str) -> str:
        """An image's path as the index stores it: relative to ``root`` when the file lies under it."""
        full = Path(self.folder or ".") / rel
        root = Path(self.root or self.folder or ".")
        return full.relative_to(root).as_posix() if full.is_relative_to(root) else str(full)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShardTask":
        return cls(**data)


def image_tasks(files: list[str], folder: str, root: str, shard_size: int) -> list[ShardTask]:
    """``files`` (relative to ``folder``) in shards of ``shard_size``."""
    return [ShardTask("images", number, files[start : start + shard_size], folder=folder, root=root)
            for number, start in enumerate(range(0, len(files), shard_size))]


def caption_tasks(items: list[dict[str, Any]], skipped: list[dict[str, str]], shard_size: int) -> list[ShardTask]:
    """Caption items in shards of ``shard_size * 4``; the skips go with the first (one task even when there
    is nothing to encode, so they reach the report)."""
    size = shard_size * CAPTION_SHARD_FACTOR
    return [ShardTask("captions", number, items[start : start + size], skipped if number == 0 else [])
            for number, start in enumerate(range(0, max(len(items), 1), size))]
