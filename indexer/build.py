"""Building and updating an index: read -> encode -> shards -> one index folder, swapped in atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from models.model import AlignModel, EncoderOutput

from . import faiss_index, layout, local_store, metadata
from .reader import CaptionRow, decode_batches, list_images, read_captions
from .writer import Shard, empty_shard, is_done, read_shards, shard_from_output, write_shard

log = logging.getLogger(__name__)
DEFAULT_SHARD_SIZE = 1024
REPORT = "build_report.json"


@dataclass
class BuildOptions:
    images: Path
    out: Path
    captions: Path | None = None
    batch_size: int = 32
    workers: int = 4
    shard_size: int = DEFAULT_SHARD_SIZE
    faiss_factory: str | None = None
    local_codec: str = local_store.DEFAULT_CODEC
    memory_budget_gb: float = 4.0
    progress: bool = True
    files: list[str] | None = None  # index only these files of ``images`` (relative paths)


class NothingIndexed(RuntimeError):
    """Every input was skipped."""


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- encoding into shards ---------------------------------------------------------------------------------

def encode_image_shards(model: AlignModel, options: BuildOptions, files: list[str], work: Path,
                        collection: str = "images", root: Path | None = None) -> None:
    """Encode ``files`` into shards under ``work``, skipping shards that a previous run finished.

    One decoding pipeline runs across all unfinished shards (batches never straddle two), so the encoder is
    not left waiting at shard boundaries. Paths are stored relative to ``root`` (the index's images root)
    when the files lie under it, else absolute."""
    base = options.images.resolve()
    root = (root or options.images).resolve()

    def stored_path(rel: str) -> str:
        full = base / rel
        return full.relative_to(root).as_posix() if full.is_relative_to(root) else str(full)

    prepare = lambda image: model.preprocess_images([image])[0]  # noqa: E731  (runs in the worker threads)
    bar = tqdm(total=len(files), desc="index images", unit="img", disable=not options.progress, smoothing=0.1)
    todo: list[tuple[int, list[str]]] = []
    for number, start in enumerate(range(0, len(files), options.shard_size)):
        chunk = files[start : start + options.shard_size]
        if is_done(work, collection, number):
            bar.update(len(chunk))
        else:
            todo.append((number, chunk))
    plan = [(number, chunk[i : i + options.batch_size], i + options.batch_size >= len(chunk))
            for number, chunk in todo for i in range(0, len(chunk), options.batch_size)]
    parts: list[EncoderOutput] = []
    items: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    batches = decode_batches(options.images, (batch for _, batch, _ in plan), options.workers, prepare)
    for (number, _, last), batch in zip(plan, batches):
        good = [d for d in batch if d.error is None]
        skipped += [{"item": d.rel, "reason": d.error} for d in batch if d.error is not None]
        if good:
            parts.append(model.encode_pixels(torch.stack([d.array for d in good])).cpu())
            items += [{"id": d.rel, "path": stored_path(d.rel), "width": d.width, "height": d.height}
                      for d in good]
        bar.update(len(batch))
        if last:
            shard = shard_from_output(EncoderOutput.concat(parts), items, skipped) if parts else empty_shard(
                model.embed_dim, skipped)
            write_shard(work, collection, number, shard)
            parts, items, skipped = [], [], []
    bar.close()


def caption_items(rows: list[CaptionRow], known_images: set[str], taken: set[str] = frozenset(),
                  present: set[tuple[str | None, str]] = frozenset()) -> tuple[list[dict], list[dict]]:
    """Caption ids and links: ``IMAGE#k`` for the k-th caption of an indexed image, else ``caption-N`` (N its
    line in the file). Ids in ``taken`` (already in the index) are stepped over; captions already in the index
    (``present``: (image, text) pairs) and empty ones are skipped with a reason."""
    per_image: dict[str, int] = defaultdict(int)
    taken = set(taken)
    items, skipped = [], []
    for n, row in enumerate(rows):
        if not row.text:
            skipped.append({"item": f"caption {n + 1}", "reason": "empty caption"})
            continue
        if (row.image, row.text) in present:
            skipped.append({"item": f"caption {n + 1}", "reason": "already in the index"})
            continue
        if row.image is not None and row.image in known_images:
            while f"{row.image}#{per_image[row.image]}" in taken:
                per_image[row.image] += 1
            item_id = f"{row.image}#{per_image[row.image]}"
            items.append({"id": item_id, "text": row.text, "image_id": row.image, "extra": row.extra})
        else:
            number = n + 1
            while f"caption-{number}" in taken:
                number += len(rows)
            item_id = f"caption-{number}"
            items.append({"id": item_id, "text": row.text, "image_id": None,
                          "extra": {**row.extra, **({"image": row.image} if row.image else {})}})
        taken.add(item_id)
    return items, skipped


def encode_caption_shards(model: AlignModel, options: BuildOptions, items: list[dict], skipped: list[dict],
                          work: Path) -> None:
    bar = tqdm(total=len(items), desc="index captions", unit="cap", disable=not options.progress)
    size = options.shard_size * 4
    for number, start in enumerate(range(0, max(len(items), 1), size)):
        chunk = items[start : start + size]
        if is_done(work, "captions", number):
            bar.update(len(chunk))
            continue
        shard_skipped = skipped if number == 0 else []
        if chunk:
            # encode in order of length (batches of similar lengths pad little), then back to file order
            order = sorted(range(len(chunk)), key=lambda i: (len(chunk[i]["text"]), i))
            out = model.encode_texts([chunk[i]["text"] for i in order], batch_size=max(options.batch_size, 64))
            back = [0] * len(order)
            for position, i in enumerate(order):
                back[i] = position
            shard = shard_from_output(out.select(back), chunk, shard_skipped)
        else:
            shard = empty_shard(model.embed_dim, shard_skipped)
        write_shard(work, "captions", number, shard)
        bar.update(len(chunk))
    bar.close()


# -- writing an index folder ------------------------------------------------------------------------------

def _sample_rows(total: int, size: int) -> np.ndarray:
    """``size`` row numbers out of ``total`` (all when fewer), sorted; seeded, so a resumed build trains
    exactly as an uninterrupted one."""
    if total <= size:
        return np.arange(total)
    return np.sort(np.random.default_rng(0).choice(total, size, replace=False))


def _gather(arrays: list[np.ndarray], rows: np.ndarray, dim: int) -> np.ndarray:
    """Rows ``rows`` of the arrays taken end to end (memory-mapped shards: only those rows are read)."""
    out, first = [], 0
    for array in arrays:
        mine = rows[(rows >= first) & (rows < first + len(array))] - first
        if len(mine):
            out.append(np.asarray(array[mine], dtype=np.float32))
        first += len(array)
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def train_codec(dim: int, factory: str, shards: list[Shard], fallback: list[Shard] = ()) -> Any:
    """The local codec, trained (when it needs training) on a sample of the shards' local vectors; on
    ``fallback``'s (the other collection: the same joint space) when these shards have none."""
    for source in (shards, fallback):
        arrays = [s.local_vectors for s in source]
        total = sum(len(a) for a in arrays)
        if total:
            sample = _gather(arrays, _sample_rows(total, local_store.TRAIN_SAMPLE), dim)
            return local_store.make_codec(dim, factory, sample)
    return local_store.make_codec(dim, factory, np.zeros((0, dim), np.float32), train=False)


def _global_sample(factory: str, sources: list[list[Shard]], dim: int) -> np.ndarray:
    """Training vectors for a global index: a seeded sample of the first source that has any."""
    for shards in sources:
        arrays = [s.global_vectors for s in shards]
        total = sum(len(a) for a in arrays)
        if total:
            return _gather(arrays, _sample_rows(total, faiss_index.training_size(factory, total)), dim)
    return np.zeros((0, dim), np.float32)


def write_collection(folder: Path, shards: list[Shard], first_row: int, factory: str, codec: Any,
                     previous: tuple[Any, local_store.LocalStore] | None = None, dim: int | None = None,
                     fallback: list[Shard] = ()) -> dict[str, Any]:
    """Global FAISS index + local store of one collection from ``shards``, streamed shard by shard (only the
    FAISS index is held in memory); appends to ``previous`` (index, store) if given, with row ids from
    ``first_row``. A global index that needs training is trained on a sample of ``shards`` (or of
    ``fallback``, the other collection, when these are empty). Every file is written to a temp name and
    renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    dim = dim or codec.d
    if previous is None:
        sample = lambda: _global_sample(factory, [shards, list(fallback)], dim)  # noqa: E731
        index, store = faiss_index.new_index(dim, factory, sample), None
    else:
        index, store = previous
    row = first_row
    for shard in shards:
        if len(shard.items):
            ids = np.arange(row, row + len(shard.items), dtype=np.int64)
            index.add_with_ids(np.ascontiguousarray(shard.global_vectors, dtype=np.float32), ids)
            row += len(shard.items)
    lengths = np.concatenate([np.asarray(s.lengths, dtype=np.int64) for s in shards] or [np.zeros(0, np.int64)])
    local_store.write_store_streaming(folder, codec, (s.local_vectors for s in shards), lengths, previous=store)
    faiss_index.write(index, folder / layout.GLOBAL_FILE)
    items = (0 if store is None else len(store)) + len(lengths)
    local_vectors = (0 if store is None else int(store.offsets[-1])) + int(lengths.sum())
    return {"factory": factory, "type": faiss_index.describe(index), "items": int(items),
            "local_vectors": int(local_vectors), "code_size": int(codec.sa_code_size()),
            "search_params": faiss_index.default_search_params(index)}


def _insert(conn: Any, name: str, first_row: int, shards: list[Shard]) -> None:
    """Metadata rows of ``shards``, numbered from ``first_row``."""
    row = first_row
    for shard in shards:
        if name == "images":
            metadata.insert_images(conn, row, [metadata.ImageItem(i["id"], i["path"], i["width"], i["height"])
                                               for i in shard.items])
        else:
            metadata.insert_captions(conn, row, [metadata.CaptionItem(i["id"], i["text"], i["image_id"],
                                                                      i.get("extra", {})) for i in shard.items])
        row += len(shard.items)


def model_fields(model: AlignModel) -> dict[str, Any]:
    return {"fingerprint": model.fingerprint, "source": getattr(model, "source", None),
            "config": model.config.to_dict(), "dim": int(model.embed_dim)}


def build(model: AlignModel, options: BuildOptions) -> dict[str, Any]:
    """Build (or resume building) the index at ``options.out``; returns the build report.

    Work happens in ``OUT.partial/`` beside the target: finished shards survive a crash and a rerun with the
    same inputs skips them; the finished index is swapped into place in one rename. Captions naming an image
    that is not indexed (absent or unreadable) are kept as standalone captions (``image`` kept in their
    metadata)."""
    files = list_images(options.images)
    if options.files is not None:
        wanted = set(options.files)
        files = [f for f in files if f in wanted]
    caption_rows = read_captions(options.captions) if options.captions else []
    if options.faiss_factory:
        faiss_index.validate_factory(options.faiss_factory, model.embed_dim)
    local_store.make_codec(model.embed_dim, options.local_codec, np.zeros((0, model.embed_dim), np.float32),
                           train=False)  # fail on a bad codec string before encoding anything
    with layout.exclusive(options.out):
        return _build(model, options, files, caption_rows)


def _build(model: AlignModel, options: BuildOptions, files: list[str], caption_rows: list[CaptionRow]
           ) -> dict[str, Any]:
    work = options.out.with_name(options.out.name + ".partial")
    plan = {"model": model.fingerprint, "files": _digest(files), "captions": _digest([vars(r) for r in caption_rows]),
            "shard_size": options.shard_size, "images": str(options.images.resolve())}
    plan_file = work / "build.json"
    if work.exists() and (not plan_file.is_file() or json.loads(plan_file.read_text()) != plan):
        shutil.rmtree(work)  # a different build was interrupted here: start over
    work.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(plan))

    encode_image_shards(model, options, files, work)
    shards = {"images": read_shards(work, "images")}
    cap_items, cap_skipped = caption_items(caption_rows, {it["id"] for s in shards["images"] for it in s.items})
    encode_caption_shards(model, options, cap_items, cap_skipped, work)
    shards["captions"] = read_shards(work, "captions")
    counts = {name: sum(len(s.items) for s in shards[name]) for name in layout.COLLECTIONS}
    report = {"images_indexed": counts["images"], "captions_indexed": counts["captions"],
              "skipped": [k for name in layout.COLLECTIONS for s in shards[name] for k in s.skipped]}
    if not counts["images"] and not counts["captions"]:
        shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming
        first = "; ".join(f"{k['item']}: {k['reason']}" for k in report["skipped"][:3])
        raise NothingIndexed(f"nothing was indexed: all {len(report['skipped'])} items were skipped ({first})")

    final = work / "index"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    collections = {}
    for name, other in (("images", "captions"), ("captions", "images")):
        factory = options.faiss_factory or faiss_index.choose_factory(
            counts[name], model.embed_dim, options.memory_budget_gb * 1e9)
        codec = train_codec(model.embed_dim, options.local_codec, shards[name], shards[other])
        collections[name] = write_collection(final / name, shards[name], 0, factory, codec, dim=model.embed_dim,
                                             fallback=shards[other])
    conn = metadata.connect(final / layout.METADATA)
    for name in layout.COLLECTIONS:
        _insert(conn, name, 0, shards[name])
    metadata.close_for_checksum(conn)
    layout.write_manifest(final, {
        "model": model_fields(model), "images_root": str(options.images.resolve()),
        "local_codec": options.local_codec, "collections": collections,
        "counts": {"images": counts["images"], "captions": counts["captions"],
                   "images_deleted": 0, "captions_deleted": 0},
    })
    (final / REPORT).write_text(json.dumps(report, indent=2))
    layout.replace_folder(final, options.out)
    shutil.rmtree(work, ignore_errors=True)
    return report


# -- incremental updates -----------------------------------------------------------------------------------

def _update(index_dir: Path, change: Callable[[Path, dict], dict]) -> dict:
    """Apply ``change`` to a copy of the index and swap it in atomically.

    The copy hard-links the data files (SQLite, changed in place, is copied) and every changed file is written
    to a temp name and renamed, so the live index is untouched until the swap, whatever happens before it;
    checksums of files still shared with the live index are carried over."""
    with layout.exclusive(index_dir):
        layout.recover(index_dir)
        manifest = layout.read_manifest(index_dir)
        problems = layout.check_files(index_dir, manifest)
        if problems:
            raise layout.IndexError_(f"{index_dir} is corrupt, refusing to update it: {'; '.join(problems)}")
        work = index_dir.with_name(f".{index_dir.name}.update")
        shutil.rmtree(work, ignore_errors=True)
        try:
            layout.link_copy(index_dir, work)
            previous = manifest["files"]
            fields = change(work, json.loads(json.dumps(manifest)))
            fields = {k: v for k, v in fields.items() if k not in ("files", "format_version", "updated")}
            layout.write_manifest(work, fields, reuse={
                name: entry for name, entry in previous.items()
                if (work / name).is_file() and os.path.samefile(work / name, index_dir / name)})
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        layout.replace_folder(work, index_dir)
        return fields


def add(model: AlignModel, index_dir: Path, options: BuildOptions) -> dict[str, Any]:
    """Add the images of ``options.images`` not yet in the index (by id) and ``options.captions``."""
    from .index import check_model

    manifest = layout.read_manifest(index_dir)
    check_model(manifest, model)
    report: dict[str, Any] = {}

    def change(work: Path, manifest: dict) -> dict:
        conn = metadata.connect(work / layout.METADATA)
        existing = {r[0] for r in conn.execute("SELECT id FROM images")}
        files = [f for f in list_images(options.images) if f not in existing]
        tmp = work.with_name(work.name + ".shards")  # encoded new items (not resumable: an add is redone)
        shutil.rmtree(tmp, ignore_errors=True)
        encode_image_shards(model, options, files, tmp, root=Path(manifest["images_root"]))
        shards = {"images": read_shards(tmp, "images")}
        known = existing | {i["id"] for s in shards["images"] for i in s.items}
        rows = read_captions(options.captions) if options.captions else []
        taken, present = set(), set()
        for r in conn.execute("SELECT id, text, image_id, extra FROM captions WHERE deleted = 0"):
            taken.add(r[0])
            present.add((r[2] or json.loads(r[3]).get("image"), r[1]))
        taken |= {r[0] for r in conn.execute("SELECT id FROM captions WHERE deleted = 1")}
        cap_items, cap_skipped = caption_items(rows, known, taken, present)
        encode_caption_shards(model, options, cap_items, cap_skipped, tmp)
        shards["captions"] = read_shards(tmp, "captions")
        for name in layout.COLLECTIONS:
            first = int(conn.execute(f"SELECT COALESCE(MAX(row) + 1, 0) FROM {name}").fetchone()[0])
            folder = work / name
            store = local_store.LocalStore.open(folder)
            index = faiss_index.faiss.read_index(str(folder / layout.GLOBAL_FILE))
            manifest["collections"][name] = write_collection(folder, shards[name], first,
                                                             manifest["collections"][name]["factory"],
                                                             store.codec, previous=(index, store))
            _insert(conn, name, first, shards[name])
            manifest["counts"][name] = metadata.count(conn, name, live_only=True)
        linked = metadata.link_captions(conn, [i["id"] for s in shards["images"] for i in s.items])
        metadata.close_for_checksum(conn)
        report.update(captions_linked=linked, images_added=sum(len(s.items) for s in shards["images"]),
                      captions_added=sum(len(s.items) for s in shards["captions"]),
                      skipped=[k for name in layout.COLLECTIONS for s in shards[name] for k in s.skipped])
        shutil.rmtree(tmp)
        return manifest

    _update(index_dir, change)
    return report


def delete(index_dir: Path, ids: list[str]) -> dict[str, Any]:
    """Tombstone ``ids`` (images or captions) and remove them from the global FAISS indexes."""
    layout.read_manifest(index_dir)  # a clear error for a folder that is not an index
    conn = metadata.connect(Path(index_dir) / layout.METADATA, read_only=True)
    try:
        known = {r[0] for name in layout.COLLECTIONS
                 for r in conn.execute(f"SELECT id FROM {name} WHERE deleted = 0 AND id IN "
                                       f"(SELECT value FROM json_each(?))", (json.dumps(ids),))}
    finally:
        conn.close()
    report: dict[str, Any] = {"not_found": sorted(set(ids) - known)}
    if not known:  # a no-op: leave the index (and its checksums) untouched
        return {**report, "images_deleted": 0, "captions_deleted": 0}

    def change(work: Path, manifest: dict) -> dict:
        conn = metadata.connect(work / layout.METADATA)
        known = {r[0] for name in layout.COLLECTIONS for r in conn.execute(f"SELECT id FROM {name} WHERE deleted = 0")}
        report["not_found"] = sorted(set(ids) - known)
        for name in layout.COLLECTIONS:
            rows = metadata.tombstone(conn, name, ids)
            if rows:
                path = work / name / layout.GLOBAL_FILE
                index = faiss_index.faiss.read_index(str(path))
                faiss_index.remove_ids(index, np.array(rows))
                faiss_index.write(index, path)
            report[f"{name}_deleted"] = len(rows)
            manifest["counts"][name] = metadata.count(conn, name, live_only=True)
            manifest["counts"][f"{name}_deleted"] = metadata.count(conn, name, live_only=False) - manifest["counts"][name]
        metadata.close_for_checksum(conn)
        return manifest

    _update(index_dir, change)
    return report
