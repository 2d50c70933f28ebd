"""Opening an index for reading: manifest checks, the collections' stores, metadata, verify and info."""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from threading import Lock
from typing import Any

import numpy as np

from alignsearch.models.identity import RULE
from alignsearch.models.model import AlignModel

from . import filters, layout, metadata, photo_fields
from .stores import GlobalStore, LocalStore, global_backend, local_backend


def check_model(manifest: dict[str, Any], model: AlignModel) -> None:
    """Refuse a model whose vectors differ from the index's (see :mod:`models.identity`: a changed head,
    config or backbone file), in one line naming both fingerprints.

    Indexes written before fingerprint rule 2 recorded a fingerprint of the model's config and head
    weights only; they are accepted when the model's files are byte for byte the ones they were built with
    (``model.legacy_fingerprint``), and the next ``index add`` records the new fingerprint."""
    entry = manifest["model"]
    expected = entry["fingerprint"]
    rule = entry.get("fingerprint_rule", 1)
    got = model.fingerprint if rule == RULE else getattr(model, "legacy_fingerprint", None)
    if got != expected:
        from alignsearch.models.factory import shipped_model_named_by

        shipped = shipped_model_named_by(expected) if rule == RULE else None
        advice = (f"it was built with the shipped model {shipped!r}: pass --model {shipped}, or rebuild the index"
                  if shipped else "rebuild the index or load the model it was built with")
        raise layout.IndexError_(
            f"model fingerprint {model.fingerprint} ({getattr(model, 'source', '?')}) does not match the index's "
            f"{expected} ({entry.get('source')}; the model's weights, config or backbone files changed): {advice}")


@dataclass
class Collection:
    """One side of the index: the global store, the local store, and the tombstoned rows."""

    name: str
    index: GlobalStore
    store: LocalStore
    deleted: set[int]

    @property
    def live(self) -> int:
        return len(self.store) - len(self.deleted)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """First-stage search of the global store: (scores, row ids), each n x k."""
        return self.index.search(queries, k)


def require_listed(folder: Path, names: Any, manifest: dict[str, Any]) -> None:
    """Refuse to open a data file that the manifest does not list (its checksum would cover nothing)."""
    for rel in names:
        if rel not in manifest["files"]:
            raise layout.IndexError_(f"{folder / rel}: not listed in the manifest's files (added, or its entry "
                                     f"removed, after the index was written): refusing to open it")


def open_collection(folder: Path, name: str, manifest: dict[str, Any], conn: Any, use_gpu: bool = False,
                    writable: bool = False, check: bool = True) -> Collection:
    """The collection ``name`` of the index in ``folder`` through the backends its manifest names; only files
    the manifest lists are opened. Opened for reading (not ``writable``), its structure is checked
    (:func:`structure_problems`, unless ``check`` is False) and a collection with a problem is refused, in one
    line naming the file."""
    entry = manifest["collections"][name]
    backend, local = global_backend(entry.get("backend")), local_backend(entry.get("local_backend"))
    require_listed(folder, [f"{name}/{f}" for f in (*backend.files, *local.files)], manifest)
    index = backend.open(folder / name, entry, use_gpu=use_gpu, writable=writable)
    store = local.open(folder / name)
    col = Collection(name, index, store, metadata.deleted_rows(conn, name))
    if check and not writable:
        problems = structure_problems(col, conn, manifest)
        if problems:
            raise layout.IndexError_(f"{folder / name}/{'; '.join(problems)}")
    return col


def structure_problems(col: Collection, conn: Any, manifest: dict[str, Any]) -> list[str]:
    """What does not fit together in a collection, each naming its file (relative to the collection's folder):
    the local store's arrays (dtype, shape, offsets increasing and within the codes, the codec's dimension),
    and the counts of the global store, the local store, SQLite and the manifest. No data is read beyond the
    offsets (one pass over 8 bytes per item) and SQLite's row counts: 1M photos cost a few milliseconds."""
    name, dim = col.name, manifest["model"]["dim"]
    problems = col.store.check(dim)
    total = metadata.count(conn, name, live_only=False)
    live = metadata.count(conn, name, live_only=True)
    if len(col.store) != total:
        problems.append(f"{col.store.backend} local store: {len(col.store)} items, {layout.METADATA} {total}")
    store_dim = getattr(col.index, "dim", dim)
    if store_dim != dim:
        problems.append(f"{col.index.backend} global store: {store_dim}-d vectors, the model's are {dim}-d")
    if col.index.count() not in (live, total):
        problems.append(f"{col.index.backend} global store: {col.index.count()} vectors, {layout.METADATA} {live} "
                        f"live / {total} items")
    if manifest["counts"].get(name) != live:
        problems.append(f"{layout.MANIFEST}: counts {manifest['counts'].get(name)} {name}, {layout.METADATA} {live} "
                        f"live")
    return problems


def discard_stores(folder: Path) -> None:
    """Drop what the index in ``folder`` keeps outside its folder (a Qdrant backend's collections), for a
    temporary index about to be removed; nothing for backends whose files are all in the folder."""
    manifest = layout.read_manifest(folder)
    for name in layout.COLLECTIONS:
        entry = manifest["collections"][name]
        discard = getattr(global_backend(entry.get("backend")), "discard", None)
        if discard is not None:
            discard(folder / name, entry)


@dataclass
class Allowed:
    """The live rows of a collection that a filter allows: sorted ``rows``, and ``mask`` (by row id) for
    testing candidates."""

    rows: np.ndarray
    mask: np.ndarray

    @property
    def count(self) -> int:
        return len(self.rows)

    def contains(self, rows: np.ndarray) -> np.ndarray:
        """Which of ``rows`` are allowed (ids beyond the mask, or -1, are not)."""
        rows = np.asarray(rows, dtype=np.int64)
        inside = (rows >= 0) & (rows < len(self.mask))
        out = np.zeros(len(rows), dtype=bool)
        out[inside] = self.mask[rows[inside]]
        return out


@dataclass(frozen=True)
class StoreFilter:
    """A filter for a store that can run it itself (Qdrant's payload filter): the filter (checked), the
    index's field types, and the rows SQLite allows (what the store's answer must stay within)."""

    filter: Any
    types: dict[str, str]
    allowed: Allowed


ALLOWED_CACHE = 64  # filters whose allowed rows an index version keeps (its SQLite never changes)


class Index:
    """A read-only view of an index folder."""

    def __init__(self, folder: str | Path, check: str = "full", use_gpu: bool = True,
                 manifest: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        layout.recover(self.folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"index folder not found: {self.folder}")
        layout.clean_leftovers(self.folder)
        self.manifest = manifest if manifest is not None else layout.read_manifest(self.folder)
        if check != "none":
            problems = layout.check_files(self.folder, self.manifest) if check == "full" else [
                f"{n}: missing or resized" for n, f in self.manifest["files"].items()
                if not (self.folder / n).is_file() or (self.folder / n).stat().st_size != f["bytes"]]
            if problems:
                raise layout.IndexError_(f"{self.folder}: files do not match the manifest: {'; '.join(problems)}")
        require_listed(self.folder, [layout.METADATA], self.manifest)
        try:
            self.conn = metadata.connect(self.folder / layout.METADATA, read_only=True)
            metadata.count(self.conn, "images", live_only=False)  # a damaged file fails here, not mid-search
        except sqlite3.DatabaseError as exc:
            raise layout.IndexError_(f"{self.folder / layout.METADATA}: not a readable SQLite database "
                                     f"({exc})") from None
        self.collections = {name: open_collection(self.folder, name, self.manifest, self.conn, use_gpu,
                                                  check=check != "none")
                            for name in layout.COLLECTIONS}

    @property
    def images(self) -> Collection:
        return self.collections["images"]

    @property
    def captions(self) -> Collection:
        return self.collections["captions"]

    @property
    def images_root(self) -> Path:
        return Path(self.manifest["images_root"])

    def rows(self, collection: str, rows: list[int]) -> dict[int, dict[str, Any]]:
        return metadata.row_dicts(self.conn, collection, rows)

    def fields_of(self, rows: list[int]) -> dict[int, dict[str, Any]]:
        """The fields of the images at ``rows`` as results show them (:func:`photo_fields.shown`)."""
        types = self.field_types
        return {row: photo_fields.shown(values, types) for row, values in metadata.image_fields(self.conn, rows).items()}

    def image_by_id(self, image_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM images WHERE id = ? AND deleted = 0", (image_id,)).fetchone()
        return dict(row) if row else None

    def allowed(self, collection: str, filter_: Any) -> Allowed:
        """The live rows of ``collection`` that ``filter_`` allows (:mod:`indexer.filters`; a caption is allowed
        when its image is). Raises :class:`filters.FilterError` for a bad filter. The last ``ALLOWED_CACHE``
        filters' sets are kept: this version of the index never changes."""
        expr, params = filters.compile_filter(filter_, self.field_types)  # checked first, every time
        key = (collection, filters.canonical(filter_))
        cache = self.__dict__.setdefault("_allowed", OrderedDict())
        with self.__dict__.setdefault("_allowed_lock", Lock()):
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
        images = f"SELECT row FROM images WHERE deleted = 0 AND {expr}"
        sql = images if collection == "images" else \
            f"SELECT row FROM captions WHERE deleted = 0 AND image_row IN ({images})"
        rows = np.array([r[0] for r in self.conn.execute(sql + " ORDER BY row", params)], dtype=np.int64)
        size = int(self.conn.execute(f"SELECT COALESCE(MAX(row) + 1, 0) FROM {collection}").fetchone()[0])
        mask = np.zeros(size, dtype=bool)
        mask[rows] = True
        allowed = Allowed(rows, mask)
        with self.__dict__["_allowed_lock"]:
            cache[key] = allowed
            while len(cache) > ALLOWED_CACHE:
                cache.popitem(last=False)
        return allowed

    @property
    def field_types(self) -> dict[str, str]:
        """The photos' fields a filter can name, and their types (none for an index written before fields)."""
        if not hasattr(self, "_field_types"):
            self._field_types = metadata.field_types(self.conn)
        return self._field_types

    def fields_info(self) -> dict[str, dict[str, Any]]:
        """Each field's type and how many live photos have it."""
        if not self.field_types:
            return {}
        have = dict(self.conn.execute("SELECT f.field, COUNT(DISTINCT f.row) FROM image_fields f JOIN images i "
                                      "ON i.row = f.row WHERE i.deleted = 0 GROUP BY f.field").fetchall())
        return {name: {"type": kind, "photos": int(have.get(name, 0))} for name, kind in self.field_types.items()}

    def info(self) -> dict[str, Any]:
        """Counts, bytes per item, model, store backends and FAISS types."""
        files = self.manifest["files"]
        out: dict[str, Any] = {"folder": str(self.folder), "model": {k: self.manifest["model"][k]
                                                                      for k in ("fingerprint", "source", "dim")},
                               "counts": self.manifest["counts"], "local_codec": self.manifest["local_codec"]}
        for name, col in self.collections.items():
            n = max(len(col.store), 1)
            entry = self.manifest["collections"][name]
            global_bytes = sum(files.get(f"{name}/{f}", {}).get("bytes", 0)
                               for f in global_backend(entry.get("backend")).files)
            out[name] = {
                "backend": col.index.backend, "local_backend": col.store.backend,
                "local_codec": entry.get("local_codec", self.manifest["local_codec"]),
                "faiss": entry["factory"], "faiss_type": entry["type"],
                "items": len(col.store), "live": col.live,
                "local_vectors": col.store.total_vectors,
                "bytes_per_item": {"global": round(global_bytes / n, 1), "local": round(col.store.nbytes / n, 1)},
            }
        out["fields"] = self.fields_info()
        out["metadata_bytes"] = files[layout.METADATA]["bytes"]
        items = sum(len(col.store) for col in self.collections.values())
        out["metadata_bytes_per_item"] = round(out["metadata_bytes"] / max(items, 1), 1)
        return out


def verify(folder: str | Path, seal: bool = False) -> list[str]:
    """Every problem found, each naming its file: the manifest (shape, seal), checksums, files the stores open
    but the manifest does not list, the structure of each collection (:func:`structure_problems`), and the
    global store's ids against SQLite's rows."""
    folder = Path(folder)
    manifest = layout.read_manifest(folder, unsealed_ok=seal)  # a manifest it cannot trust: IndexError_
    problems = layout.check_files(folder, manifest)
    if problems:
        return problems
    try:
        index = Index(folder, check="none", use_gpu=False, manifest=manifest)
    except layout.IndexError_ as exc:
        return [str(exc)]
    for name, col in index.collections.items():
        live = metadata.count(index.conn, name, live_only=True)
        found = structure_problems(col, index.conn, manifest)
        deep = getattr(col.store, "check_points", None)  # a store outside the folder: all it holds, read again
        found = found or (deep(full=True) if deep is not None else [])
        problems += [f"{name}/{p}" for p in found]
        if found:
            continue
        if (ids := col.index.ids()) is not None:
            rows = np.array(sorted(r[0] for r in index.conn.execute(
                f"SELECT row FROM {name}" + (" WHERE deleted = 0" if len(ids) == live else ""))), dtype=np.int64)
            if not np.array_equal(ids, rows):
                problems.append(f"{name}: global store ids are not SQLite's row ids")
    if seal and not problems and layout.SEAL not in manifest:
        index.conn.close()
        layout.seal_manifest(folder, manifest)
    return problems
