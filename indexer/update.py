"""Incremental updates of an index, each one transaction: copy (hard links), change, swap in atomically."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from alignsearch.models.model import AlignModel
from alignsearch.models.precomputed import check_input

from . import layout, metadata, photo_fields
from .assemble import insert_metadata, model_fields, store_fields, sync_store_fields, write_collection
from .build import BuildOptions, encode_all, user_fields
from .caption_ids import caption_items
from .index import check_model, open_collection
from .reader import read_captions, scan_features, scan_images
from .stores import global_backend, local_backend


def transaction(index_dir: Path, change: Callable[[Path, dict], dict]) -> dict:
    """Apply ``change`` to a copy of the index and swap it in atomically.

    The copy hard-links the data files (SQLite, changed in place, is copied) and every changed file is written
    to a temp name and renamed, so the live index is untouched until the swap, whatever happens before it;
    checksums of files still shared with the live index are carried over. A symlink to the index is resolved
    first: the real index is changed (under its one lock) and the symlink stays."""
    index_dir = layout.real_path(index_dir)
    with layout.exclusive(index_dir):
        layout.recover(index_dir)
        manifest = layout.read_manifest(index_dir)
        problems = layout.check_files(index_dir, manifest)
        if problems:
            raise layout.IndexError_(f"{index_dir} is corrupt, refusing to update it: {'; '.join(problems)}")
        work = index_dir.with_name(f".{index_dir.name}.update")
        shutil.rmtree(work, ignore_errors=True)
        with layout.disk_full_is_one_line(index_dir, work):
            try:
                layout.link_copy(index_dir, work)
                previous = manifest["files"]
                fields = change(work, json.loads(json.dumps(manifest)))
                fields = {k: v for k, v in fields.items() if k not in ("files", "format_version", "updated")}
                layout.write_manifest(work, fields, reuse={
                    name: entry for name, entry in previous.items()
                    if (work / name).is_file() and os.path.samefile(work / name, index_dir / name)})
                layout.sync_tree(work)  # durable before the swap: an update acknowledged survives a power cut
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
        layout.replace_folder(work, index_dir)
        return fields


def add(model: AlignModel, index_dir: Path, options: BuildOptions) -> dict[str, Any]:
    """Add the images of ``options.images`` (or ``options.features``) not yet in the index (by id) and
    ``options.captions``."""
    manifest = layout.read_manifest(index_dir)
    check_model(manifest, model)
    check_input(model, options.features)
    conn = metadata.connect(Path(index_dir) / layout.METADATA, read_only=True)
    try:
        known = metadata.field_types(conn)
    finally:
        conn.close()
    rows = read_captions(options.captions) if options.captions else []
    fields = user_fields(rows, options.metadata, known)  # a bad field fails before any encoding
    given = set(photo_fields.read_metadata_file(options.metadata)) if options.metadata else set()
    report: dict[str, Any] = {}
    scratch: list[Path] = []  # removed whatever happens (a failed add is redone from the start)

    def change(work: Path, manifest: dict) -> dict:
        conn = metadata.connect(work / layout.METADATA)
        existing = {r[0] for r in conn.execute("SELECT id FROM images WHERE deleted = 0")}
        if options.features is not None:
            listed, unread = scan_features(options.features, rows), Counter()
            if options.files is not None:
                wanted = set(options.files)
                listed = [f for f in listed if f in wanted]
        elif options.files is not None:  # these files only: no scan of the whole folder
            listed, unread = [f for f in options.files if (options.images / f).is_file()], Counter()
        else:
            listed, unread = scan_images(options.images)
        files = [f for f in listed if f not in existing]
        metadata.retire_deleted_ids(conn, files)  # a deleted photo added again is indexed again, as a new row
        taken, present = set(), set()
        for r in conn.execute("SELECT id, text, image_id, extra FROM captions WHERE deleted = 0"):
            taken.add(r[0])
            present.add((r[2] or json.loads(r[3]).get("image"), r[1]))
        taken |= {r[0] for r in conn.execute("SELECT id FROM captions WHERE deleted = 1")}
        tmp = work.with_name(work.name + ".shards")  # encoded new items (not resumable: an add is redone)
        shutil.rmtree(tmp, ignore_errors=True)
        scratch.append(tmp)
        shards = encode_all(model, options, files, tmp, Path(manifest["images_root"]),
                            lambda known: caption_items(rows, existing | known, taken, present))
        new_rows: list[int] = []
        for name in layout.COLLECTIONS:
            first = int(conn.execute(f"SELECT COALESCE(MAX(row) + 1, 0) FROM {name}").fetchone()[0])
            if name == "images":
                new_rows = list(range(first, first + sum(len(s.items) for s in shards[name])))
            col = open_collection(work, name, manifest, conn, writable=True)
            entry = manifest["collections"][name]
            manifest["collections"][name] = write_collection(
                work / name, shards[name], first, entry["factory"], col.store.codec, previous=(col.index, col.store),
                backend=global_backend(entry.get("backend")), local=local_backend(entry.get("local_backend")))
            insert_metadata(conn, name, first, shards[name], Path(manifest["images_root"]), fields)
            manifest["counts"][name] = metadata.count(conn, name, live_only=True)
        updated = update_fields(conn, {i: fields[i] for i in given & existing})
        sync_store_fields(work, manifest["collections"], conn, new_rows + _rows_of(conn, sorted(given & existing)))
        linked = metadata.link_captions(conn, [i["id"] for s in shards["images"] for i in s.items])
        metadata.close_for_checksum(conn)
        manifest["model"] = model_fields(model)  # an index of the previous fingerprint rule is migrated here
        added = [i["id"] for s in shards["images"] for i in s.items]
        report.update(metadata_updated=updated, captions_linked=linked, images_added=len(added), added_ids=added,
                      captions_added=sum(len(s.items) for s in shards["captions"]),
                      skipped=[k for name in layout.COLLECTIONS for s in shards[name] for k in s.skipped],
                      not_read=dict(sorted(unread.items())))
        return manifest

    try:
        transaction(index_dir, change)
    finally:
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)
    return report


def set_fields(index_dir: Path, given: dict[str, photo_fields.Raw]) -> dict[str, Any]:
    """Replace the named fields of live indexed images (image id -> field -> values; an empty list removes the
    field), in one transaction; nothing else changes. Returns ``{"updated": n, "not_found": [...]}``. Values
    that do not fit a field's type raise :class:`photo_fields.FieldError` before anything is written."""
    conn = metadata.connect(Path(index_dir) / layout.METADATA, read_only=True)
    try:
        known = metadata.field_types(conn)
        live = {r[0] for r in conn.execute("SELECT id FROM images WHERE deleted = 0 AND id IN "
                                           "(SELECT value FROM json_each(?))", (json.dumps(list(given)),))}
    finally:
        conn.close()
    photo_fields.typed({n: given[i] for n, i in enumerate(given)}, {**photo_fields.BUILTIN_TYPES, **known},
                       dict(enumerate(given)))
    report: dict[str, Any] = {"updated": 0, "not_found": sorted(set(given) - live)}
    if not live:
        return report

    def change(work: Path, manifest: dict) -> dict:
        conn = metadata.connect(work / layout.METADATA)
        report["updated"] = update_fields(conn, {i: given[i] for i in live})
        sync_store_fields(work, manifest["collections"], conn, _rows_of(conn, sorted(live)))
        metadata.close_for_checksum(conn)
        return manifest

    transaction(index_dir, change)
    return report


def update_fields(conn: sqlite3.Connection, given: dict[str, photo_fields.Raw], replace: bool = True) -> int:
    """Set the fields of live indexed images (image id -> field -> values; an empty list removes a field);
    ``replace`` False: the given values are added to the field's. Returns how many images were updated."""
    raw, label = {}, {}
    for image_id, fields in given.items():
        found = conn.execute("SELECT row FROM images WHERE id = ? AND deleted = 0", (image_id,)).fetchone()
        if found:
            raw[found[0]], label[found[0]] = fields, image_id
    store_fields(conn, raw, label, replace=replace)
    return len(raw)


def _rows_of(conn: sqlite3.Connection, image_ids: list[str]) -> list[int]:
    """Rows of the live images ``image_ids``."""
    return [r[0] for r in conn.execute("SELECT row FROM images WHERE deleted = 0 AND id IN "
                                       "(SELECT value FROM json_each(?))", (json.dumps(image_ids),))]


def _captions_of(conn: Any, image_rows: list[int], exclude: set[str]) -> list[str]:
    """Ids of the live captions of the images at ``image_rows``, less those in ``exclude``."""
    found = conn.execute("SELECT c.id FROM captions c JOIN images i ON c.image_id = i.id WHERE c.deleted = 0 "
                         "AND i.row IN (SELECT value FROM json_each(?)) ORDER BY c.row", (json.dumps(image_rows),))
    return [r[0] for r in found if r[0] not in exclude]


def _live_ids(conn: sqlite3.Connection, ids: list[str]) -> set[str]:
    """Which of ``ids`` name a live (not deleted) image or caption."""
    return {r[0] for name in layout.COLLECTIONS
            for r in conn.execute(f"SELECT id FROM {name} WHERE deleted = 0 AND id IN "
                                  f"(SELECT value FROM json_each(?))", (json.dumps(ids),))}


def delete(index_dir: Path, ids: list[str]) -> dict[str, Any]:
    """Tombstone ``ids`` (images or captions) and remove them from the global stores that can remove.

    Deleting an image deletes its captions too (``captions_deleted_with_images`` says how many; they are
    counted in ``captions_deleted``), so they no longer come back from a search, before or after a restart.
    Ids that are not live in the index are reported in ``not_found``; when none is, nothing is rewritten."""
    layout.read_manifest(index_dir)  # a clear error for a folder that is not an index
    conn = metadata.connect(Path(index_dir) / layout.METADATA, read_only=True)
    try:
        live = _live_ids(conn, ids)
    finally:
        conn.close()
    report: dict[str, Any] = {"not_found": sorted(set(ids) - live), "captions_deleted_with_images": 0}
    if not live:  # a no-op: leave the index (and its checksums) untouched
        return {**report, "images_deleted": 0, "captions_deleted": 0}

    def change(work: Path, manifest: dict) -> dict:
        conn = metadata.connect(work / layout.METADATA)
        report["not_found"] = sorted(set(ids) - _live_ids(conn, ids))  # again, under the lock
        wanted = {"images": list(ids), "captions": list(ids)}
        for name in layout.COLLECTIONS:  # images first: their captions go with them
            rows = metadata.tombstone(conn, name, wanted[name])
            if name == "images" and rows:
                with_images = _captions_of(conn, rows, exclude=set(ids))
                wanted["captions"] += with_images
                report["captions_deleted_with_images"] = len(with_images)
            if rows:
                col = open_collection(work, name, manifest, conn, writable=True)
                col.index.remove(np.array(rows))
                col.index.save(work / name)
            report[f"{name}_deleted"] = len(rows)
            manifest["counts"][name] = metadata.count(conn, name, live_only=True)
            manifest["counts"][f"{name}_deleted"] = metadata.count(conn, name, live_only=False) - manifest["counts"][name]
        metadata.close_for_checksum(conn)
        return manifest

    transaction(index_dir, change)
    return report
