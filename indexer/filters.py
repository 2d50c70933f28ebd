"""The filter language: which photos a search may return, in Qdrant's shape, checked against the index's
fields (:mod:`indexer.photo_fields`) and evaluated in SQLite to the set of allowed rows.

A filter is ``{"must": [...], "should": [...], "must_not": [...]}`` (each optional): every ``must`` condition
holds, at least one ``should`` condition holds (when there are any), no ``must_not`` condition holds. A
condition is a nested filter or one of::

    {"key": F, "match": {"value": V}}             F has the value V (of a multi-valued field: one of its values)
    {"key": F, "match": {"any": [V, ...]}}        F has one of the values
    {"key": F, "range": {"gte": A, "lt": B}}      F (number or date) has a value within the bounds (gt/gte/lt/lte)
    {"key": F, "prefix": "a/b"}                   F (text) is ``a/b`` or lies under it (``a/b/...``; not ``a/bc``)

Dates are ISO 8601 strings (``2024-05-01``, ``2024-05-01T10:00:00Z``) or seconds since 1970. A malformed filter,
an unknown field or a value of the wrong type raises :class:`FilterError` with where it is
(``filter.must[0].match.value``) and, for a known field, its name and type; the input is never copied.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .photo_fields import parse_date

CLAUSES = ("must", "should", "must_not")
MAX_CONDITIONS = 64  # in the whole filter
MAX_ANY = 1024  # values of one match.any
MAX_DEPTH = 4
RANGE_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


class FilterError(ValueError):
    """A filter that cannot run: ``loc`` says where (``filter.must[0].key``), the message what is wrong."""

    def __init__(self, loc: str, message: str) -> None:
        super().__init__(f"{loc}: {message}")
        self.loc = loc
        self.message = message


def _scalar(kind: str, value: Any, loc: str, key: str) -> Any:
    """``value`` as the stored form of a ``kind`` field, or FilterError."""
    if kind == "string" and isinstance(value, str):
        return value
    if kind == "number" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if kind == "bool" and isinstance(value, bool):
        return int(value)
    if kind == "date":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        seconds = parse_date(value)
        if seconds is not None:
            return seconds
        raise FilterError(loc, f"field {key!r} is a date: give an ISO 8601 date (2024-05-01, 2024-05-01T10:00:00Z) "
                               "or seconds since 1970")
    expected = {"string": "a string", "number": "a number", "bool": "true or false"}[kind]
    raise FilterError(loc, f"field {key!r} is a {kind} field: the value must be {expected}")


stored_value = _scalar  # a filter's value as the field's stored form (also what the Qdrant payload holds)


class _Compiler:
    """Turns a checked filter into one SQL expression over ``images.row`` and its parameters."""

    def __init__(self, types: dict[str, str]) -> None:
        self.types = types
        self.params: list[Any] = []
        self.conditions = 0

    def filter(self, node: Any, loc: str, depth: int = 0) -> str:
        if not isinstance(node, dict):
            raise FilterError(loc, "a filter is an object with must, should and/or must_not")
        unknown = [k for k in node if k not in CLAUSES]
        if unknown:
            raise FilterError(loc, "a filter has only must, should and must_not")
        if depth > MAX_DEPTH:
            raise FilterError(loc, f"filters nest at most {MAX_DEPTH} deep")
        parts = []
        for clause in CLAUSES:
            items = node.get(clause)
            if items is None:
                continue
            if isinstance(items, dict):
                items = [items]  # one condition given without its list
            if not isinstance(items, list):
                raise FilterError(f"{loc}.{clause}", "must be a list of conditions")
            exprs = [self.condition(c, f"{loc}.{clause}[{i}]", depth) for i, c in enumerate(items)]
            if not exprs:
                continue
            if clause == "must":
                parts += exprs
            elif clause == "should":
                parts.append("(" + " OR ".join(exprs) + ")")
            else:
                parts += [f"NOT ({e})" for e in exprs]
        return "(" + " AND ".join(parts) + ")" if parts else "1"

    def condition(self, node: Any, loc: str, depth: int) -> str:
        self.conditions += 1
        if self.conditions > MAX_CONDITIONS:
            raise FilterError(loc, f"a filter has at most {MAX_CONDITIONS} conditions")
        if isinstance(node, dict) and node and all(k in CLAUSES for k in node):
            return self.filter(node, loc, depth + 1)
        if not isinstance(node, dict) or "key" not in node:
            raise FilterError(loc, "a condition is {key, match | range | prefix} or a nested filter")
        kinds = [k for k in ("match", "range", "prefix") if k in node]
        if len(kinds) != 1 or len(node) != 2:
            raise FilterError(loc, "a condition has a key and exactly one of match, range, prefix")
        key = node["key"]
        if not isinstance(key, str) or key not in self.types:
            known = ", ".join(sorted(self.types)[:40]) or "none: the index has no fields"
            raise FilterError(f"{loc}.key", f"unknown field (this index's fields: {known})")
        kind, op = self.types[key], kinds[0]
        self.params.append(key)
        test = getattr(self, op)(node[op], f"{loc}.{op}", key, kind)
        return f"row IN (SELECT row FROM image_fields WHERE field = ? AND {test})"

    def match(self, spec: Any, loc: str, key: str, kind: str) -> str:
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in ("value", "any"):
            raise FilterError(loc, "match is {\"value\": V} or {\"any\": [V, ...]}")
        if "value" in spec:
            self.params.append(_scalar(kind, spec["value"], f"{loc}.value", key))
            return "value = ?"
        values = spec["any"]
        if not isinstance(values, list) or not 1 <= len(values) <= MAX_ANY:
            raise FilterError(f"{loc}.any", f"match.any is a list of 1 to {MAX_ANY} values")
        self.params += [_scalar(kind, v, f"{loc}.any[{i}]", key) for i, v in enumerate(values)]
        return f"value IN ({','.join('?' * len(values))})"

    def range(self, spec: Any, loc: str, key: str, kind: str) -> str:
        if kind not in ("number", "date"):
            raise FilterError(loc, f"field {key!r} is a {kind} field: range applies to number and date fields")
        if not isinstance(spec, dict) or not spec or any(k not in RANGE_OPS for k in spec):
            raise FilterError(loc, "range is an object of gt, gte, lt and/or lte")
        tests = []
        for name, bound in spec.items():
            self.params.append(_scalar(kind, bound, f"{loc}.{name}", key))
            tests.append(f"value {RANGE_OPS[name]} ?")
        return " AND ".join(tests)

    def prefix(self, spec: Any, loc: str, key: str, kind: str) -> str:
        if kind != "string":
            raise FilterError(loc, f"field {key!r} is a {kind} field: prefix applies to text fields")
        if not isinstance(spec, str):
            raise FilterError(loc, "prefix is a string (a folder path such as a/b)")
        path = spec.strip("/")
        if not path:
            return "1"
        # the path itself, or anything under it: path + "/" <= value < path + "0" ("0" follows "/")
        self.params += [path, path + "/", path + "0"]
        return "(value = ? OR (value >= ? AND value < ?))"


def compile_filter(filter_: Any, types: dict[str, str]) -> tuple[str, list[Any]]:
    """A SQL condition on ``row`` (of the images table) and its parameters; FilterError when the filter is
    malformed or does not fit ``types`` (the index's fields)."""
    compiler = _Compiler(types)
    expr = compiler.filter(filter_, "filter")
    return expr, compiler.params


def canonical(filter_: Any) -> str:
    """A key that is the same for equal filters (for caching their allowed sets)."""
    return json.dumps(filter_, sort_keys=True, separators=(",", ":"), default=repr)
