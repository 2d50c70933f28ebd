"""Training datasets: images with their captions (read by :mod:`models.captions`), and the validation carve-out."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from .captions import DatasetError, read_caption_rows

__all__ = ["DatasetError", "ImageRecord", "TRAIN_SPLITS", "load_dataset", "select_split"]


@dataclass
class ImageRecord:
    filename: str
    split: str = "train"
    captions: list[str] = field(default_factory=list)


TRAIN_SPLITS = ("train", "restval")


def load_dataset(path: str | Path) -> list[ImageRecord]:
    """Images with their captions, in file order, from any caption file :func:`~models.captions.read_caption_rows`
    reads; captions without an image are left out (a Karpathy file's split is kept, else ``train``)."""
    grouped: dict[str, ImageRecord] = {}
    for row in read_caption_rows(path):
        if row.image is not None:
            record = grouped.setdefault(row.image, ImageRecord(row.image, str(row.extra.get("split", "train"))))
            record.captions.append(row.text)
    if not grouped:
        raise DatasetError(f"{path}: no captions with an image")
    return list(grouped.values())


def select_split(
    records: list[ImageRecord], split: str, val_size: int = 100, seed: int = 0
) -> list[ImageRecord]:
    """Records of ``split``. ``train`` and ``val`` are carved from the training images when the file has no
    ``val`` split: ``val_size`` of them, chosen by ``seed``, held out for model selection."""
    if split in ("train", "val") and not any(r.split == "val" for r in records):
        train = [r for r in records if r.split in TRAIN_SPLITS]
        held = set(random.Random(seed).sample(range(len(train)), min(val_size, len(train) // 5 or 0)))
        if split == "val":
            return [r for i, r in enumerate(train) if i in held]
        return [r for i, r in enumerate(train) if i not in held]
    if split == "train":
        return [r for r in records if r.split in TRAIN_SPLITS]
    chosen = [r for r in records if r.split == split]
    if not chosen:
        raise DatasetError(f"no images in split {split!r} (splits present: {sorted({r.split for r in records})})")
    return chosen
