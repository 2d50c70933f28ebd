"""Assembling an index folder from finished shards: codec and global-index training, the stores, SQLite.

Everything is streamed shard by shard from the memory-mapped shard files (only the global store is held in
memory); training samples are seeded, so a resumed build assembles exactly what an uninterrupted one does.
A global store that needs training (IVF) is trained once, on a sample, and every shard is added to it. Adding
is done here in one process; a distributed assembly would fill one clone of the trained store per shard and
merge their inverted lists as faiss's ``contrib.ondisk.merge_ondisk`` does (not built yet: adding is cheap
next to encoding at the sizes this project serves).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from alignsearch.models.identity import RULE
from alignsearch.models.model import AlignModel

from . import metadata, photo_fields
from .layout import COLLECTIONS, METADATA, write_manifest
from .stores import GlobalBackend, GlobalStore, LocalBackend, LocalStore, global_backend, local_backend
from .writer import Shard

TRAIN_SAMPLE = 65_536  # local vectors a codec is trained on, at most


def model_fields(model: AlignModel) -> dict[str, Any]:
    """The manifest's ``model`` entry: what the index's vectors were made with."""
    return {"fingerprint": model.fingerprint, "fingerprint_rule": RULE, "source": getattr(model, "source", None),
            "config": model.config.to_dict(), "dim": int(model.embed_dim)}


def sample_rows(total: int, size: int) -> np.ndarray:
    """``size`` row numbers out of ``total`` (all when fewer), sorted; seeded."""
    if total <= size:
        return np.arange(total)
    return np.sort(np.random.default_rng(0).choice(total, size, replace=False))


def gather_rows(arrays: list[np.ndarray], rows: np.ndarray, dim: int) -> np.ndarray:
    """Rows ``rows`` of the arrays taken end to end (memory-mapped shards: only those rows are read)."""
    out, first = [], 0
    for array in arrays:
        mine = rows[(rows >= first) & (rows < first + len(array))] - first
        if len(mine):
            out.append(np.asarray(array[mine], dtype=np.float32))
        first += len(array)
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def _sample(sources: list[list[Shard]], field: str, size: Callable[[int], int], dim: int) -> np.ndarray:
    """A seeded sample of ``field`` (``size(total)`` rows) from the first source that has any."""
    for shards in sources:
        arrays = [getattr(s, field) for s in shards]
        total = sum(len(a) for a in arrays)
        if total:
            return gather_rows(arrays, sample_rows(total, size(total)), dim)
    return np.zeros((0, dim), np.float32)


def train_codec(dim: int, spec: str, shards: list[Shard], fallback: list[Shard] = (),
                backend: LocalBackend | None = None) -> Any:
    """The local codec, trained (when it needs training) on a sample of the shards' local vectors; on
    ``fallback``'s (the other collection: the same joint space) when these shards have none."""
    sample = _sample([shards, list(fallback)], "local_vectors", lambda total: TRAIN_SAMPLE, dim)
    return (backend or local_backend()).make_codec(dim, spec, sample)


def write_collection(folder: Path, shards: list[Shard], first_row: int, spec: str, codec: Any,
                     previous: tuple[GlobalStore, LocalStore] | None = None, dim: int | None = None,
                     fallback: list[Shard] = (), backend: GlobalBackend | None = None,
                     local: LocalBackend | None = None) -> dict[str, Any]:
    """The global and local stores of one collection from ``shards``, appended to ``previous`` (global
    store, local store) if given, with row ids from ``first_row``. A global store that needs training is
    trained on a sample of ``shards`` (or of ``fallback``, the other collection, when these are empty).
    Returns the collection's manifest entry."""
    backend, local = backend or global_backend(), local or local_backend()
    folder.mkdir(parents=True, exist_ok=True)
    dim = dim or previous[1].dim
    if previous is None:
        index = backend.create(dim, spec, lambda: _sample([shards, list(fallback)], "global_vectors",
                                                          lambda total: backend.training_size(spec, total), dim),
                               codec=codec)
        store = None
    else:
        index, store = previous
    row = first_row
    for shard in shards:
        if len(shard.items):
            index.add(shard.global_vectors, np.arange(row, row + len(shard.items), dtype=np.int64))
            row += len(shard.items)
    lengths = np.concatenate([np.asarray(s.lengths, dtype=np.int64) for s in shards] or [np.zeros(0, np.int64)])
    local.write(folder, codec, (s.local_vectors for s in shards), lengths, previous=store)
    index.save(folder)
    written = local.open(folder)
    return {**index.describe(), "local_backend": local.name, "items": len(written),
            "local_vectors": written.total_vectors, "code_size": written.code_size}


def insert_metadata(conn: Any, name: str, first_row: int, shards: list[Shard], root: Path | None = None,
                    fields: Mapping[str, photo_fields.Raw] | None = None) -> None:
    """Metadata rows of ``shards`` in collection ``name``, numbered from ``first_row``; for images, their
    fields too: what the build reads of the files under ``root`` and the user's ``fields`` (image id -> field ->
    values, :mod:`indexer.photo_fields`)."""
    row = first_row
    for shard in shards:
        if name == "images":
            metadata.insert_images(conn, row, [metadata.ImageItem(i["id"], i["path"], i["width"], i["height"])
                                               for i in shard.items])
            store_fields(conn, {row + n: photo_fields.merged(photo_fields.file_fields(item, root) if root else None,
                                                             (fields or {}).get(item["id"]))
                                for n, item in enumerate(shard.items)},
                         {row + n: item["id"] for n, item in enumerate(shard.items)})
        else:
            metadata.insert_captions(conn, row, [metadata.CaptionItem(i["id"], i["text"], i["image_id"],
                                                                      i.get("extra", {})) for i in shard.items])
        row += len(shard.items)


def sync_store_fields(folder: Path, collections: dict[str, Any], conn: Any, rows: list[int] | None) -> None:
    """Hand the photos' fields (SQLite's, through ``conn``) to a global store that filters on them itself
    (Qdrant's payload): every photo (``rows`` None, a new index) or those at ``rows`` (added or changed). Nothing
    for a store that does not (FAISS: filters run on SQLite's allowed rows)."""
    entry = collections["images"]
    sync = getattr(global_backend(entry.get("backend")), "sync_fields", None)
    if sync is not None:
        sync(folder / "images", entry, conn, rows)


def store_fields(conn: Any, raw: dict[int, photo_fields.Raw], label: dict[int, str], replace: bool = False) -> None:
    """Type ``raw`` (image row -> field -> values) against the fields the index has, declare the new ones, and
    store the values (``replace``: a named field's old values of that row go)."""
    values, new = photo_fields.typed(raw, metadata.field_types(conn), label)
    metadata.declare_fields(conn, new)
    metadata.set_image_fields(conn, values, replace=replace)


def _most_regions(shards: list[Shard]) -> int | None:
    """The most regions one item of ``shards`` has (what a per-photo codec budget is sized for); None when empty."""
    counts = [int(np.max(s.lengths)) for s in shards if len(s.lengths)]
    return max(counts) if counts else None


def assemble_index(final: Path, model: AlignModel, shards: dict[str, list[Shard]], images_root: Path,
                   local_codec: str, global_spec: str | None = None, memory_budget_bytes: float = 4e9,
                   backend: GlobalBackend | None = None, local: LocalBackend | None = None,
                   fields: Mapping[str, photo_fields.Raw] | None = None) -> dict[str, Any]:
    """Write the index folder ``final`` from the finished shards of both collections: each collection's
    stores (a global spec chosen by the backend for its size unless ``global_spec``), SQLite (with the photos'
    fields: read from their files, and ``fields`` given by image id), and the manifest last. Returns the
    manifest."""
    backend, local = backend or global_backend(), local or local_backend()
    counts = {name: sum(len(s.items) for s in shards[name]) for name in COLLECTIONS}
    collections = {}
    for name, other in (("images", "captions"), ("captions", "images")):
        spec = global_spec or backend.choose(counts[name], model.embed_dim, memory_budget_bytes)
        codec_spec = local.spec_for(local_codec, name, _most_regions(shards[name]) if name == "images" else None,
                                    model.embed_dim)
        codec = train_codec(model.embed_dim, codec_spec, shards[name], shards[other], local)
        collections[name] = write_collection(final / name, shards[name], 0, spec, codec, dim=model.embed_dim,
                                             fallback=shards[other], backend=backend, local=local)
        collections[name]["local_codec"] = codec_spec
    conn = metadata.connect(final / METADATA)
    for name in COLLECTIONS:
        insert_metadata(conn, name, 0, shards[name], images_root, fields)
    sync_store_fields(final, collections, conn, None)
    metadata.close_for_checksum(conn)
    return write_manifest(final, {
        "model": model_fields(model), "images_root": str(images_root), "local_codec": local_codec,
        "collections": collections,
        "counts": {"images": counts["images"], "captions": counts["captions"], "images_deleted": 0,
                   "captions_deleted": 0},
    })
