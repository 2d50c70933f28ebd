"""Caption datasets: Karpathy-format JSON, ``image,caption`` CSV, or JSON lines; plus the validation carve-out."""

from __future__ import annotations

import csv
import json
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path


class DatasetError(ValueError):
    """A dataset file that cannot be read as any supported format."""


@dataclass
class ImageRecord:
    filename: str
    split: str = "train"
    captions: list[str] = field(default_factory=list)


TRAIN_SPLITS = ("train", "restval")


def load_dataset(path: str | Path) -> list[ImageRecord]:
    """Read ``path`` (Karpathy JSON, ``image,caption`` CSV, or JSON lines with ``image`` and ``caption``)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _from_pairs(_read_csv(path), path)
    if suffix in (".jsonl", ".ndjson"):
        return _from_pairs(_read_jsonl(path), path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: malformed JSON ({exc})") from exc
    return _from_karpathy(data, path)


def _from_karpathy(data: object, path: Path) -> list[ImageRecord]:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: expected a Karpathy-format object with an 'images' list")
    records = []
    for i, item in enumerate(data["images"]):
        try:
            captions = [str(s["raw"]).strip() for s in item["sentences"]]
            records.append(ImageRecord(str(item["filename"]), str(item.get("split", "train")), captions))
        except (KeyError, TypeError) as exc:
            raise DatasetError(f"{path}: images[{i}] lacks filename or sentences[].raw ({exc})") from exc
    return records


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: a caption CSV needs the header 'image,caption'")
        return [(row["image"] or "", row["caption"] or "") for row in reader]


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append((str(row.get("image") or ""), str(row["caption"])))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise DatasetError(f"{path}:{n}: expected a JSON object with 'caption' (and 'image')") from exc
    return pairs


def _from_pairs(pairs: list[tuple[str, str]], path: Path) -> list[ImageRecord]:
    grouped: OrderedDict[str, ImageRecord] = OrderedDict()
    for image, caption in pairs:
        if not image.strip():
            continue
        grouped.setdefault(image, ImageRecord(image)).captions.append(caption.strip())
    if not grouped:
        raise DatasetError(f"{path}: no image,caption rows")
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
