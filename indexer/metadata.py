"""Item metadata in SQLite (WAL): ids, paths, sizes, caption text, caption -> image links, tombstones."""

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
"""


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
