"""The filter language (:mod:`indexer.filters`) as a Qdrant payload filter, and the payload it reads.

A photo's point carries its fields as payload (:func:`payload`): ``f_<name in hex>`` holds the field's values
as SQLite stores them (strings, numbers and dates as floats, bools as 0/1), and for a text field
``p_<name in hex>`` holds every folder a value lies in (``a/b/c`` -> ``""``, ``a``, ``a/b``, ``a/b/c``), so that
``prefix`` is an exact keyword ``match`` (Qdrant has no prefix match on keywords). Field names are hex-encoded
because a name may contain a dot, which a payload key reads as nesting.

Each condition maps exactly (same result as the SQL of :func:`filters.compile_filter`; a multi-valued field
holds a condition when one of its values does, in both):

- ``match`` of a text or bool value -> keyword / integer ``match``; of a number or date -> ``range`` with
  ``gte = lte = value`` (Qdrant matches integers and keywords, not floats); ``match.any`` likewise (numbers:
  one range per value, any of them);
- ``range`` -> ``range`` on the float values;
- ``prefix P`` -> ``match`` of ``P`` stripped of slashes on the ``p_`` key (``""``: the photo has the field);
- ``must`` / ``should`` / ``must_not`` and nesting -> Qdrant's own (``should`` nested, so that it is ANDed
  with the rest as in SQL).

The result is an engine-neutral tree (:class:`Clause` and its leaves) that each engine converts
(:mod:`indexer.qdrant_engines`). The filter is checked by :func:`filters.compile_filter` first (the search
computes the allowed rows from SQLite anyway): here it is assumed valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .filters import CLAUSES, stored_value

FV = "fv"  # the payload's fields version (see :mod:`indexer.qdrant_store`)


@dataclass(frozen=True)
class Match:
    key: str
    value: Any


@dataclass(frozen=True)
class AnyOf:
    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Range:
    key: str
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


@dataclass(frozen=True)
class Ids:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class HasVector:
    name: str


@dataclass
class Clause:
    """Every ``must`` holds, one of ``should`` when there are any, no ``must_not`` (an empty clause: all)."""

    must: list[Any] = field(default_factory=list)
    should: list[Any] = field(default_factory=list)
    must_not: list[Any] = field(default_factory=list)


def value_key(name: str) -> str:
    return "f_" + name.encode().hex()


def folder_key(name: str) -> str:
    return "p_" + name.encode().hex()


def folders(value: str) -> list[str]:
    """The paths ``P`` for which ``prefix P`` holds of ``value`` (as in SQL: ``value == P`` or it starts with
    ``P/``; ``P`` has no leading or trailing slash), with ``""`` (the prefix of every value)."""
    out = [""]
    for i, ch in enumerate(value):
        if ch == "/":
            head = value[:i]
            if head and not head.startswith("/") and not head.endswith("/"):
                out.append(head)
    if value and not value.startswith("/") and not value.endswith("/"):
        out.append(value)
    return list(dict.fromkeys(out))


def payload(row: int, fields: dict[str, list[Any]], types: dict[str, str], version: int) -> dict[str, Any]:
    """The payload of the photo at ``row`` with its stored field values (:func:`metadata.image_fields`)."""
    out: dict[str, Any] = {"row": int(row), FV: int(version)}
    for name, values in fields.items():
        kind = types.get(name)
        if kind == "string":
            out[value_key(name)] = [str(v) for v in values]
            out[folder_key(name)] = sorted({p for v in values for p in folders(str(v))})
        elif kind == "bool":
            out[value_key(name)] = [int(v) for v in values]
        elif kind in ("number", "date"):
            out[value_key(name)] = [float(v) for v in values]
    return out


def index_kinds(types: dict[str, str]) -> dict[str, str]:
    """The payload indexes the fields need: key -> ``keyword``, ``float`` or ``integer``."""
    out = {FV: "integer"}
    for name, kind in types.items():
        if kind == "string":
            out[value_key(name)] = out[folder_key(name)] = "keyword"
        else:
            out[value_key(name)] = "integer" if kind == "bool" else "float"
    return out


def to_clause(filter_: Any, types: dict[str, str]) -> Clause:
    """The Qdrant form of a checked filter."""
    must, must_not = [], []
    for name in CLAUSES:
        items = filter_.get(name)
        if items is None:
            continue
        conditions = [_condition(c, types) for c in (items if isinstance(items, list) else [items])]
        if not conditions:
            continue
        if name == "must":
            must += conditions
        elif name == "should":
            must.append(Clause(should=conditions))
        else:
            must_not += conditions
    return Clause(must=must, must_not=must_not)


def _condition(node: dict[str, Any], types: dict[str, str]) -> Any:
    if node and all(k in CLAUSES for k in node):
        return to_clause(node, types)
    key = node["key"]
    kind, loc = types[key], "filter"
    if "prefix" in node:
        return Match(folder_key(key), node["prefix"].strip("/"))
    if "range" in node:
        bounds = {op: stored_value(kind, v, loc, key) for op, v in node["range"].items()}
        return Range(value_key(key), **bounds)
    spec = node["match"]
    values = [spec["value"]] if "value" in spec else list(spec["any"])
    stored = [stored_value(kind, v, loc, key) for v in values]
    if kind in ("number", "date"):
        ranges = [Range(value_key(key), gte=v, lte=v) for v in dict.fromkeys(stored)]
        return ranges[0] if len(ranges) == 1 else Clause(should=ranges)
    return Match(value_key(key), stored[0]) if len(stored) == 1 else AnyOf(value_key(key), tuple(stored))
