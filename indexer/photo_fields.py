"""A photo's fields, the metadata filters read: what the build reads itself (``folder``, ``mtime``, the EXIF
capture date ``taken``, ``width`` and ``height``) and what the user gives (the captions file's extra columns,
a JSON-lines file ``{"image": ..., FIELD: VALUE, ...}``), typed for SQLite (:mod:`indexer.metadata`).

Types: ``string``, ``number``, ``date`` (stored as seconds since the epoch, UTC), ``bool``. A field keeps the
type it was first given: a new field is a number when every value is a number or text that reads as one, a
date when every value is an ISO 8601 date or date-time, a bool when every value is ``true``/``false`` (JSON),
else a string; later values are converted to the field's type or refused. A list gives a field several values
(tags); a photo's captions that carry different values of a column give it each of them.
"""

from __future__ import annotations

import json
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from alignsearch.models.captions import CaptionRow

BUILTIN_TYPES = {"folder": "string", "mtime": "date", "taken": "date", "width": "number", "height": "number"}
MAX_NAME = 64
MAX_VALUES = 64  # values of one field of one photo
MAX_TEXT = 1000  # characters of a string value
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?(Z|[+-]\d{2}:\d{2})?$")
_EXIF_IFD, _DATE_TIME_ORIGINAL, _DATE_TIME = 0x8769, 0x9003, 0x0132

Raw = dict[str, list[Any]]  # field -> raw values of one photo


class FieldError(ValueError):
    """A field name or value that cannot be stored (one line, naming the field)."""


def valid_name(name: Any) -> bool:
    """Field names: a letter or ``_`` first, then letters, digits, ``_ . -``; at most 64 characters."""
    return isinstance(name, str) and bool(_NAME.match(name))


def parse_date(value: Any) -> float | None:
    """An ISO 8601 date or date-time (``2024-05-01``, ``2024-05-01T10:30:00Z``; no zone means UTC) as seconds
    since the epoch; None when ``value`` is not one."""
    if not isinstance(value, str) or not _ISO.match(value.strip()):
        return None
    text = value.strip().replace(" ", "T")
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def format_date(seconds: float) -> str:
    """Seconds since the epoch as an ISO 8601 UTC date-time (``2024-05-01T10:30:00Z``)."""
    moment = datetime.fromtimestamp(float(seconds), tz=timezone.utc)
    return moment.isoformat(timespec="seconds" if moment.microsecond == 0 else "microseconds").replace("+00:00", "Z")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str) and value.strip():
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _bool(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    return None


def _text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, float, str)):
        text = str(value)
        return text if len(text) <= MAX_TEXT else None
    return None


def _date(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else None
    return parse_date(value)


CONVERT = {"string": _text, "number": _number, "date": _date, "bool": _bool}


def infer_type(values: Iterable[Any]) -> str:
    """The type a new field gets from its values (see the module's rule)."""
    values = list(values)
    if values and all(isinstance(v, bool) for v in values):
        return "bool"
    if values and all(_number(v) is not None for v in values):
        return "number"
    if values and all(isinstance(v, str) and parse_date(v) is not None for v in values):
        return "date"
    return "string"


def typed(raw: dict[int, Raw], known: dict[str, str], label: dict[int, str]) -> tuple[dict[int, Raw], dict[str, str]]:
    """``raw`` (row -> field -> values) converted to the fields' types: those in ``known``, else inferred from
    every value given here. Returns (row -> field -> stored values, the new fields' types). ``label`` names a
    row's photo in errors."""
    new: dict[str, list[Any]] = {}
    for fields in raw.values():
        for name, values in fields.items():
            if not valid_name(name):
                raise FieldError("a metadata field name must be a letter or '_' then letters, digits, '_', '.', '-' "
                                 f"(at most {MAX_NAME} characters)")
            if name not in known and values:
                new.setdefault(name, []).extend(values)
    types = {name: BUILTIN_TYPES.get(name) or infer_type(values) for name, values in new.items()}
    every = {**known, **types}
    out: dict[int, Raw] = {}
    for row, fields in raw.items():
        stored: Raw = {}
        for name, values in fields.items():
            if not values:
                stored[name] = []
                continue
            kind = every[name]
            if len(values) > MAX_VALUES:
                raise FieldError(f"metadata field {name!r} of {label.get(row, row)} has more than {MAX_VALUES} values")
            converted = [CONVERT[kind](v) for v in values]
            if any(c is None for c in converted):
                raise FieldError(f"metadata field {name!r} is a {kind} field: a value of {label.get(row, row)} is not "
                                 f"a {kind}" + (" (an ISO 8601 date, or seconds since 1970)" if kind == "date" else ""))
            stored[name] = list(dict.fromkeys(converted))
        out[row] = stored
    return out, types


def shown(stored: Raw, types: dict[str, str]) -> dict[str, Any]:
    """A photo's stored field values as a result shows them: dates as ISO strings, whole numbers as ints, bools
    as booleans; one value as itself, several as a list."""
    out: dict[str, Any] = {}
    for name, values in stored.items():
        kind = types.get(name, "string")
        if kind == "date":
            values = [format_date(v) for v in values]
        elif kind == "number":
            values = [int(v) if float(v).is_integer() else v for v in values]
        elif kind == "bool":
            values = [bool(v) for v in values]
        out[name] = values[0] if len(values) == 1 else values
    return out


# -- sources --------------------------------------------------------------------------------------------------

def _values(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [v for v in value if v is not None and not isinstance(v, (list, dict))]
    return [] if value is None or isinstance(value, dict) else [value]


def read_metadata_file(path: Path) -> dict[str, Raw]:
    """A JSON-lines file of ``{"image": ID, FIELD: VALUE or [VALUES], ...}`` -> image id -> field -> values.
    Raises FieldError naming the file and line on a malformed line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    out: dict[str, Raw] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not obj["image"].strip():
            raise FieldError(f"{path}:{n}: expected a JSON object with 'image' (the photo's id) and its fields")
        fields = out.setdefault(obj["image"].strip(), {})
        for name, value in obj.items():
            if name != "image":
                fields[name] = _values(value)
    return out


def caption_fields(rows: Iterable[CaptionRow]) -> dict[str, Raw]:
    """The captions file's extra columns as fields of the photos the captions name: image -> field -> the
    distinct values its captions carry (empty CSV cells ignored)."""
    out: dict[str, Raw] = {}
    for row in rows:
        if row.image is None:
            continue
        fields = out.setdefault(row.image, {})
        for name, value in row.extra.items():
            for v in _values(value):
                if v != "" and v not in fields.setdefault(name, []):
                    fields[name].append(v)
    return {image: {k: v for k, v in fields.items() if v} for image, fields in out.items()}


def exif_taken(path: Path) -> float | None:
    """The EXIF capture date (DateTimeOriginal, else DateTime) of the photo at ``path``, as seconds since the
    epoch read as UTC (EXIF has no zone); None when absent or unreadable. Reads the header only."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return taken_from_exif(image.getexif())
    except Exception:  # noqa: BLE001  (any file Pillow cannot parse simply has no capture date)
        return None


def taken_from_exif(exif: Any) -> float | None:
    """:func:`exif_taken` of a file's EXIF tags already read (``Image.getexif``); None when absent or unreadable."""
    try:
        value = exif.get_ifd(_EXIF_IFD).get(_DATE_TIME_ORIGINAL) or exif.get(_DATE_TIME)
    except Exception:  # noqa: BLE001  (as exif_taken: unparsable tags are no capture date)
        return None
    if not isinstance(value, str) or not re.match(r"^\d{4}:\d{2}:\d{2} \d{2}:\d{2}:\d{2}", value.strip()):
        return None
    date, time = value.strip()[:19].split(" ")
    return parse_date(f"{date.replace(':', '-')}T{time}")


def read_file_facts(path: Path, exif: Any = None) -> Raw:
    """What a photo's file says of it (the fields :func:`file_fields` reads from the file: ``mtime``, and
    ``taken`` when it has one), from its EXIF tags ``exif`` when they were read already (the build's decode
    processes read both while the file is open); empty when the file is gone."""
    try:
        out: Raw = {"mtime": [os.stat(path).st_mtime]}
    except OSError:
        return {}
    taken = exif_taken(path) if exif is None else taken_from_exif(exif)
    if taken is not None:
        out["taken"] = [taken]
    return out


def file_fields(item: dict[str, Any], root: Path) -> Raw:
    """What the build reads itself of an indexed photo (``item``: its id, stored path, width and height):
    ``folder`` (the folder of its path relative to the images root, ``""`` at the root), ``mtime``, ``taken``
    (EXIF), ``width``, ``height``. A file no longer there gives the fields its item has. The file's facts come
    from ``item["file"]`` when the decode process read them (:func:`read_file_facts`), else from the file."""
    stored = PurePosixPath(item["path"])
    folder = (stored if not stored.is_absolute() else PurePosixPath(item["id"])).parent.as_posix()
    out: Raw = {"folder": ["" if folder == "." else folder], "width": [item["width"]], "height": [item["height"]]}
    facts = item["file"] if "file" in item else read_file_facts(root / item["path"])
    return {**out, **facts}


def merged(*sources: Raw | None) -> Raw:
    """Fields of one photo from several sources, a later source's field replacing an earlier one's."""
    out: Raw = {}
    for source in sources:
        out.update(source or {})
    return out
