"""Building and updating an index: read -> encode -> shards -> one index folder, swapped in atomically."""

from __future__ import annotations

import hashlib
import json
import logging
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
from .reader import CaptionRow, decoded_batches, list_images, read_captions
from .writer import Shard, concat, empty_shard, is_done, read_shard, shard_from_output, write_shard

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
                        collection: str = "images") -> None:
    """Encode ``files`` into shards under ``work``, skipping shards that a previous run finished."""
    prepare = lambda image: model.preprocess_images([image])[0]  # noqa: E731  (runs in the worker threads)
    bar = tqdm(total=len(files), desc="index images", unit="img", disable=not options.progress, smoothing=0.1)
    for number, start in enumerate(range(0, len(files), options.shard_size)):
        chunk = files[start : start + options.shard_size]
        if is_done(work, collection, number):
            bar.update(len(chunk))
            continue
        parts: list[EncoderOutput] = []
        items: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        for batch in decoded_batches(options.images, chunk, options.batch_size, options.workers, prepare):
            good = [d for d in batch if d.error is None]
            skipped += [{"item": d.rel, "reason": d.error} for d in batch if d.error is not None]
            if good:
                parts.append(model.encode_pixels(torch.stack([d.array for d in good])).cpu())
                items += [{"id": d.rel, "path": d.rel, "width": d.width, "height": d.height} for d in good]
            bar.update(len(batch))
        shard = shard_from_output(EncoderOutput.concat(parts), items, skipped) if parts else empty_shard(
            model.embed_dim, skipped)
        write_shard(work, collection, number, shard)
    bar.close()


def caption_items(rows: list[CaptionRow], known_images: set[str]) -> tuple[list[dict], list[dict]]:
    """Caption ids and links: ``IMAGE#k`` for the k-th caption of an indexed image, else ``caption-N``."""
    per_image: dict[str, int] = defaultdict(int)
    items, skipped = [], []
    for n, row in enumerate(rows):
        if not row.text:
            skipped.append({"item": f"caption {n + 1}", "reason": "empty caption"})
            continue
        if row.image is not None and row.image in known_images:
            k = per_image[row.image]
            per_image[row.image] += 1
            items.append({"id": f"{row.image}#{k}", "text": row.text, "image_id": row.image, "extra": row.extra})
        else:
            items.append({"id": f"caption-{n + 1}", "text": row.text, "image_id": None,
                          "extra": {**row.extra, **({"image": row.image} if row.image else {})}})
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
            out = model.encode_texts([it["text"] for it in chunk], batch_size=max(options.batch_size, 64))
            shard = shard_from_output(out, chunk, shard_skipped)
        else:
            shard = empty_shard(model.embed_dim, shard_skipped)
        write_shard(work, "captions", number, shard)
        bar.update(len(chunk))
    bar.close()


def load_shards(work: Path, collection: str, dim: int) -> Shard:
    numbers = sorted(int(p.name.rsplit("-", 1)[1]) for p in (work / "shards").glob(f"{collection}-[0-9]*")
                     if not p.name.endswith(".tmp"))
    return concat([read_shard(work, collection, n) for n in numbers], dim)


# -- writing an index folder ------------------------------------------------------------------------------

def write_collection(folder: Path, shard: Shard, first_row: int, factory: str, codec: Any,
                     previous: Any = None) -> dict[str, Any]:
    """Global FAISS index + local store of one collection; appends to ``previous`` (index, store) if given."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.arange(first_row, first_row + len(shard.items), dtype=np.int64)
    if previous is None:
        index = faiss_index.build_global_index(shard.global_vectors, ids, factory)
        codes = local_store.encode(codec, shard.local_vectors.astype(np.float32))
        lengths = shard.lengths
    else:
        index, store = previous
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(shard.global_vectors, dtype=np.float32), ids)
        codes = np.concatenate([np.asarray(store.codes), local_store.encode(codec, shard.local_vectors.astype(np.float32))])
        lengths = np.concatenate([store.lengths(), shard.lengths])
    faiss_index.write(index, folder / layout.GLOBAL_FILE)
    local_store.write_store(folder, codec, codes, lengths)
    return {"factory": factory, "type": faiss_index.describe(index), "items": int(len(lengths)),
            "local_vectors": int(lengths.sum()), "code_size": int(codec.sa_code_size())}


def model_fields(model: AlignModel) -> dict[str, Any]:
    return {"fingerprint": model.fingerprint, "source": getattr(model, "source", None),
            "config": model.config.to_dict(), "dim": int(model.embed_dim)}


def build(model: AlignModel, options: BuildOptions) -> dict[str, Any]:
    """Build (or resume building) the index at ``options.out``; returns the build report."""
    files = list_images(options.images)
    if options.files is not None:
        wanted = set(options.files)
        files = [f for f in files if f in wanted]
    caption_rows = read_captions(options.captions) if options.captions else []
    if options.faiss_factory:
        faiss_index.validate_factory(options.faiss_factory, model.embed_dim)
    local_store.make_codec(model.embed_dim, options.local_codec, np.zeros((0, model.embed_dim), np.float32),
                           train=False)  # fail on a bad codec string before encoding anything
    work = options.out.with_name(options.out.name + ".partial")
    plan = {"model": model.fingerprint, "files": _digest(files), "captions": _digest([vars(r) for r in caption_rows]),
            "shard_size": options.shard_size, "images": str(options.images.resolve())}
    plan_file = work / "build.json"
    if work.exists() and (not plan_file.is_file() or json.loads(plan_file.read_text()) != plan):
        shutil.rmtree(work)  # a different build was interrupted here: start over
    work.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(plan))

    encode_image_shards(model, options, files, work)
    images = load_shards(work, "images", model.embed_dim)
    cap_items, cap_skipped = caption_items(caption_rows, {it["id"] for it in images.items})
    encode_caption_shards(model, options, cap_items, cap_skipped, work)
    captions = load_shards(work, "captions", model.embed_dim)
    report = {"images_indexed": len(images.items), "captions_indexed": len(captions.items),
              "skipped": images.skipped + captions.skipped}
    if not images.items and not captions.items:
        raise NothingIndexed(f"nothing was indexed: {len(report['skipped'])} items skipped "
                             f"(first: {report['skipped'][:3]})")

    final = work / "index"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    collections = {}
    for name, shard in (("images", images), ("captions", captions)):
        factory = options.faiss_factory or faiss_index.choose_factory(
            len(shard.items), model.embed_dim, options.memory_budget_gb * 1e9)
        codec = local_store.make_codec(model.embed_dim, options.local_codec, shard.local_vectors.astype(np.float32))
        collections[name] = write_collection(final / name, shard, 0, factory, codec)
    conn = metadata.connect(final / layout.METADATA)
    metadata.insert_images(conn, 0, [metadata.ImageItem(i["id"], i["path"], i["width"], i["height"])
                                     for i in images.items])
    metadata.insert_captions(conn, 0, [metadata.CaptionItem(i["id"], i["text"], i["image_id"], i.get("extra", {}))
                                       for i in captions.items])
    metadata.close_for_checksum(conn)
    layout.write_manifest(final, {
        "model": model_fields(model), "images_root": str(options.images.resolve()),
        "local_codec": options.local_codec, "collections": collections,
        "counts": {"images": len(images.items), "captions": len(captions.items),
                   "images_deleted": 0, "captions_deleted": 0},
    })
    (final / REPORT).write_text(json.dumps(report, indent=2))
    layout.replace_folder(final, options.out)
    shutil.rmtree(work, ignore_errors=True)
    return report


# -- incremental updates -----------------------------------------------------------------------------------

def _update(index_dir: Path, change: Callable[[Path, dict], dict]) -> dict:
    """Copy the index, apply ``change`` to the copy, re-checksum, and swap it in atomically."""
    layout.recover(index_dir)
    manifest = layout.read_manifest(index_dir)
    problems = layout.check_files(index_dir, manifest)
    if problems:
        raise layout.IndexError_(f"{index_dir} is corrupt, refusing to update it: {'; '.join(problems)}")
    work = index_dir.with_name(f".{index_dir.name}.update")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(index_dir, work)
    fields = change(work, manifest)
    fields = {k: v for k, v in fields.items() if k not in ("files", "format_version", "updated")}
    layout.write_manifest(work, fields)
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
        tmp = work / "add.partial"
        encode_image_shards(model, options, files, tmp)
        images = load_shards(tmp, "images", model.embed_dim)
        known = existing | {i["id"] for i in images.items}
        rows = read_captions(options.captions) if options.captions else []
        cap_items, cap_skipped = caption_items(rows, known)
        existing_caps = {r[0] for r in conn.execute("SELECT id FROM captions")}
        cap_items = [c for c in cap_items if c["id"] not in existing_caps]
        encode_caption_shards(model, options, cap_items, cap_skipped, tmp)
        captions = load_shards(tmp, "captions", model.embed_dim)
        shutil.rmtree(tmp)
        for name, shard in (("images", images), ("captions", captions)):
            first = int(conn.execute(f"SELECT COALESCE(MAX(row) + 1, 0) FROM {name}").fetchone()[0])
            folder = work / name
            store = local_store.LocalStore.open(folder)
            index = faiss_index.faiss.read_index(str(folder / layout.GLOBAL_FILE))
            manifest["collections"][name] = write_collection(folder, shard, first, manifest["collections"][name]["factory"],
                                                             store.codec, previous=(index, store))
            if name == "images":
                metadata.insert_images(conn, first, [metadata.ImageItem(i["id"], i["path"], i["width"], i["height"])
                                                     for i in shard.items])
            else:
                metadata.insert_captions(conn, first, [metadata.CaptionItem(i["id"], i["text"], i["image_id"],
                                                                            i.get("extra", {})) for i in shard.items])
            manifest["counts"][name] = metadata.count(conn, name, live_only=True)
        metadata.close_for_checksum(conn)
        report.update(images_added=len(images.items), captions_added=len(captions.items),
                      skipped=images.skipped + captions.skipped)
        return manifest

    _update(index_dir, change)
    return report


def delete(index_dir: Path, ids: list[str]) -> dict[str, Any]:
    """Tombstone ``ids`` (images or captions) and remove them from the global FAISS indexes."""
    report: dict[str, Any] = {"not_found": []}

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
