"""Caption files, read one way for training and for indexing: an ``image,caption`` CSV (other columns kept),
JSON lines (``caption`` required, ``image`` optional, other keys kept), or a Karpathy-format JSON (the split
kept; an image's ``filepath``, as COCO's file has, is the folder its ``filename`` is in). Each caption is one :class:`CaptionRow`; what a row without an image means is the caller's rule."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JSON_LINES = (".jsonl", ".ndjson")


class DatasetError(ValueError):
    """A caption or dataset file that cannot be read as any supported format."""


@dataclass
class CaptionRow:
    """One caption: its text (stripped; may be empty), its image (a relative path) if any, other fields."""

    text: str
    image: str | None
    extra: dict[str, Any] = field(default_factory=dict)


def read_caption_rows(path: str | Path) -> list[CaptionRow]:
    """Every caption of ``path``, in file order, by its suffix (``.csv``, ``.jsonl`` / ``.ndjson``, else
    Karpathy JSON). Raises :class:`DatasetError` naming the file (and line) on malformed input."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"captions file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return _csv(path)
        if suffix in JSON_LINES:
            return _json_lines(path)
        return _karpathy(path)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason})") from exc


def _csv(path: Path) -> list[CaptionRow]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "caption" not in reader.fieldnames:
            raise DatasetError(f"{path}: a caption CSV needs the header 'image,caption' (image optional)")
        return [CaptionRow((row.get("caption") or "").strip(), (row.get("image") or "").strip() or None,
                           {k: v for k, v in row.items() if k not in ("image", "caption") and k is not None})
                for row in reader]


def _json_lines(path: Path) -> list[CaptionRow]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = str(obj["caption"]).strip()
            image = str(obj.get("image") or "").strip() or None
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(f"{path}:{n}: expected a JSON object with 'caption' (and 'image')") from exc
        rows.append(CaptionRow(text, image, {k: v for k, v in obj.items() if k not in ("image", "caption")}))
    return rows


def _karpathy(path: Path) -> list[CaptionRow]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: malformed JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: expected a Karpathy-format object with an 'images' list")
    rows = []
    for i, item in enumerate(data["images"]):
        try:
            image, split = str(item["filename"]), str(item.get("split", "train"))
            if item.get("filepath"):  # COCO: train2014/ and val2014/ under the images root
                image = f"{str(item['filepath']).strip('/')}/{image}"
            rows += [CaptionRow(str(s["raw"]).strip(), image, {"split": split}) for s in item["sentences"]]
        except (KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(f"{path}: images[{i}] lacks filename or sentences[].raw ({exc})") from exc
    return rows
