"""Item metadata in SQLite (WAL): ids, paths, sizes, caption text, caption -> image links, tombstones, and
the photos' typed fields that filters read.

Fields: ``fields`` records each field's type (``string``, ``number``, ``date``, ``bool``); ``image_fields``
holds one (image row, field, value) per value (a multi-valued field has several), the value stored as its type
says (dates as seconds since the epoch, UTC; bools as 0/1), indexed by (field, value) for filters and by row.
Indexes written before fields existed have neither table; they read as having no fields."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, path TEXT NOT NULL,
    width INTEGER, height INTEGER, deleted INTEGER NOT NULL DEFAULT 0, extra TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS captions (
    row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, text TEXT NOT NULL,
    image_row INTEGER, image_id TEXT, deleted INTEGER NOT NULL DEFAULT 0, extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS captions_by_image ON captions(image_id);
CREATE TABLE IF NOT EXISTS fields (name TEXT PRIMARY KEY, type TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS image_fields (row INTEGER NOT NULL, field TEXT NOT NULL, value NOT NULL);
CREATE INDEX IF NOT EXISTS image_fields_by_value ON image_fields(field, value, row);
CREATE INDEX IF NOT EXISTS image_fields_by_row ON image_fields(row);
"""
FIELD_TYPES = ("string", "number", "date", "bool")


@dataclass
class ImageItem:
    id: str
    path: str
    width: int
    height: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaptionItem:
    id: str
    text: str
    image_id: str | None
    extra: dict[str, Any] = field(default_factory=dict)


def connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    """Open the metadata database; read-only connections never write (the file's checksum stays valid)."""
    if read_only:
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
    conn.row_factory = sqlite3.Row
    return conn


def close_for_checksum(conn: sqlite3.Connection) -> None:
    """Fold the WAL into the main file so the database is one stable file, then close."""
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()


def insert_images(conn: sqlite3.Connection, first_row: int, items: Iterable[ImageItem]) -> None:
    conn.executemany(
        "INSERT INTO images(row, id, path, width, height, extra) VALUES (?, ?, ?, ?, ?, ?)",
        [(first_row + i, it.id, it.path, it.width, it.height, json.dumps(it.extra)) for i, it in enumerate(items)],
    )


def insert_captions(conn: sqlite3.Connection, first_row: int, items: Iterable[CaptionItem]) -> None:
    rows = []
    for i, it in enumerate(items):
        image_row = None
        if it.image_id is not None:
            found = conn.execute("SELECT row FROM images WHERE id = ?", (it.image_id,)).fetchone()
            image_row = found[0] if found else None
        rows.append((first_row + i, it.id, it.text, image_row, it.image_id if image_row is not None else None,
                     json.dumps(it.extra)))
    conn.executemany(
        "INSERT INTO captions(row, id, text, image_row, image_id, extra) VALUES (?, ?, ?, ?, ?, ?)", rows
    )


def link_captions(conn: sqlite3.Connection, image_ids: Iterable[str]) -> int:
    """Link standalone captions that name one of ``image_ids`` (in ``extra.image``) to that image, now indexed;
    returns how many were linked."""
    linked = 0
    for image_id in image_ids:
        found = conn.execute("SELECT row FROM images WHERE id = ? AND deleted = 0", (image_id,)).fetchone()
        if found:
            linked += conn.execute(
                "UPDATE captions SET image_row = ?, image_id = ? WHERE image_id IS NULL AND "
                "json_extract(extra, '$.image') = ?", (found[0], image_id, image_id)).rowcount
    return linked


def tombstone(conn: sqlite3.Connection, table: str, ids: list[str]) -> list[int]:
    """Mark ``ids`` deleted in ``table``; returns their row ids."""
    assert table in ("images", "captions")
    rows = []
    for external in ids:
        found = conn.execute(f"SELECT row FROM {table} WHERE id = ? AND deleted = 0", (external,)).fetchone()
        if found:
            rows.append(int(found[0]))
            conn.execute(f"UPDATE {table} SET deleted = 1 WHERE row = ?", (found[0],))
    return rows


def count(conn: sqlite3.Connection, table: str, live_only: bool = True) -> int:
    where = " WHERE deleted = 0" if live_only else ""
    return int(conn.execute(f"SELECT COUNT(*) FROM {table}{where}").fetchone()[0])


def deleted_rows(conn: sqlite3.Connection, table: str) -> set[int]:
    return {int(r[0]) for r in conn.execute(f"SELECT row FROM {table} WHERE deleted = 1")}


def row_dicts(conn: sqlite3.Connection, table: str, rows: list[int]) -> dict[int, dict[str, Any]]:
    """Metadata of ``rows`` keyed by row id (``extra`` decoded)."""
    if not rows:
        return {}
    marks = ",".join("?" * len(rows))
    out = {}
    for r in conn.execute(f"SELECT * FROM {table} WHERE row IN ({marks})", [int(x) for x in rows]):
        d = dict(r)
        d["extra"] = json.loads(d["extra"])
        out[d["row"]] = d
    return out


def has_fields(conn: sqlite3.Connection) -> bool:
    """Whether the database has the field tables (indexes written before them do not)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'image_fields'").fetchone() is not None


def field_types(conn: sqlite3.Connection) -> dict[str, str]:
    """Every field and its type, by name."""
    if not has_fields(conn):
        return {}
    return {r[0]: r[1] for r in conn.execute("SELECT name, type FROM fields ORDER BY name")}


def declare_fields(conn: sqlite3.Connection, types: dict[str, str]) -> None:
    """Record the types of new fields (a field keeps the type it was first given)."""
    assert all(t in FIELD_TYPES for t in types.values())
    conn.executemany("INSERT OR IGNORE INTO fields(name, type) VALUES (?, ?)", sorted(types.items()))


def set_image_fields(conn: sqlite3.Connection, values: dict[int, dict[str, list[Any]]], replace: bool = False) -> None:
    """Store typed ``values`` (row -> field -> stored values) of images; the fields must be declared.
    ``replace``: each named field's old values of that row go first (else values are added)."""
    rows = []
    for row, fields in values.items():
        for name, stored in fields.items():
            if replace:
                conn.execute("DELETE FROM image_fields WHERE row = ? AND field = ?", (int(row), name))
            rows += [(int(row), name, v) for v in stored]
    conn.executemany("INSERT INTO image_fields(row, field, value) VALUES (?, ?, ?)", rows)


def remove_image_fields(conn: sqlite3.Connection, row: int, names: list[str]) -> None:
    conn.executemany("DELETE FROM image_fields WHERE row = ? AND field = ?", [(int(row), n) for n in names])


def image_fields(conn: sqlite3.Connection, rows: list[int]) -> dict[int, dict[str, list[Any]]]:
    """The stored values of ``rows``' fields: row -> field -> values (in insertion order)."""
    if not rows or not has_fields(conn):
        return {}
    out: dict[int, dict[str, list[Any]]] = {}
    for r in conn.execute("SELECT row, field, value FROM image_fields WHERE row IN (SELECT value FROM json_each(?)) "
                          "ORDER BY rowid", (json.dumps([int(x) for x in rows]),)):
        out.setdefault(r[0], {}).setdefault(r[1], []).append(r[2])
    return out


RETIRED_MARK = "\x1fdeleted-row-"  # never in a file name a scan lists: ids of retired rows cannot collide


def retire_deleted_ids(conn: sqlite3.Connection, ids: list[str]) -> int:
    """Rename the tombstoned image rows of ``ids`` (``ID`` -> ``ID<RETIRED_MARK>ROW``), so that those ids can be
    indexed again as new rows (ids are unique); returns how many were renamed. Live rows are left alone."""
    if not ids:
        return 0
    cur = conn.execute("UPDATE images SET id = id || ? || row WHERE deleted = 1 AND id IN "
                       "(SELECT value FROM json_each(?))", (RETIRED_MARK, json.dumps(list(ids))))
    return cur.rowcount
