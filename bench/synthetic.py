"""A synthetic index of N images (random normalised vectors, R regions each) for speed measurements.

Written through the indexer's own contract: synthetic shards (:mod:`indexer.writer`) assembled by
:func:`indexer.assemble.assemble_index`, so the Searcher reads it like any built index; the captions
collection holds one placeholder. Vectors are generated in shards, so 100k x 49 regions fit in memory.

Above ``DISTINCT`` images the regions of ``DISTINCT`` random photos are reused in turn (each image keeps its own
random global vector, and its own codes in the store): the staging shards then take ``DISTINCT`` photos' bytes
(1.9 GB) instead of the collection's (37.6 GB at 1M), while the written index is full size and every search
reads its own bytes of it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from alignsearch.indexer.assemble import assemble_index
from alignsearch.indexer.writer import Shard, read_shards, write_shard
from alignsearch.models.model import AlignModel

CHUNK = 5_000
DISTINCT = 50_000  # distinct photos' regions staged; larger collections reuse them in turn


def _normalised(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _shard(local: np.ndarray, items: list[dict]) -> Shard:
    """Items whose global vector is the normalised mean of their local ones."""
    g = local.mean(1)
    return Shard(g / np.linalg.norm(g, axis=-1, keepdims=True), local.reshape(-1, local.shape[-1]).astype(np.float16),
                 np.full(len(local), local.shape[1], np.int64), items, [])


def _reused(shard: Shard, items: list[dict], rng: np.random.Generator) -> Shard:
    """``shard``'s regions (memory-mapped, not copied) for new ``items`` with fresh global vectors near the old."""
    count = len(items)
    g = shard.global_vectors[:count] + 0.5 * _normalised(rng, (count, shard.global_vectors.shape[1]))
    rows = int(shard.lengths[:count].sum())
    return Shard(g / np.linalg.norm(g, axis=-1, keepdims=True), shard.local_vectors[:rows], shard.lengths[:count],
                 items, [])


def write_synthetic_index(folder: Path, model: AlignModel, n: int, regions: int = 49, codec: str = "SQfp16",
                          seed: int = 0, global_spec: str | None = "Flat",
                          fields: Callable[[int], dict[str, list[Any]]] | None = None) -> Path:
    """Create (or reuse, when its ``synthetic.json`` says the same) a synthetic index at ``folder``.

    ``global_spec`` None chooses the global index as a build of real data of that size would. ``fields(i)``
    gives image ``i`` fields to filter on (:mod:`indexer.photo_fields`)."""
    spec = {"n": n, "regions": regions, "codec": codec, "seed": seed, "model": model.fingerprint}
    if fields is not None:
        spec["fields"] = getattr(fields, "__qualname__", "fields")
    if global_spec != "Flat":
        spec["global_spec"] = global_spec or "chosen"
    if n > DISTINCT:
        spec["distinct"] = DISTINCT
    if (folder / "synthetic.json").is_file() and json.loads((folder / "synthetic.json").read_text()) == spec:
        return folder
    dim = model.embed_dim
    rng = np.random.default_rng(seed)
    work = folder.with_name(folder.name + ".shards")
    shutil.rmtree(work, ignore_errors=True)

    def items(start: int, stop: int) -> list[dict]:
        return [{"id": f"img{i:07d}", "path": f"img{i:07d}.jpg", "width": 224, "height": 224} for i in range(start, stop)]

    staged = min(n, DISTINCT)
    for number, start in enumerate(range(0, staged, CHUNK)):
        stop = min(staged, start + CHUNK)
        write_shard(work, "images", number, _shard(_normalised(rng, (stop - start, regions, dim)), items(start, stop)))
    caption = {"id": "caption-1", "text": "placeholder", "image_id": None, "extra": {}}
    write_shard(work, "captions", 0, _shard(_normalised(rng, (1, 4, dim)), [caption]))
    images = read_shards(work, "images")
    distinct = len(images)
    for number, start in enumerate(range(staged, n, CHUNK)):  # larger collections: the staged regions in turn
        base = images[number % distinct]
        images.append(_reused(base, items(start, min(n, start + CHUNK)), rng))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    assemble_index(folder, model, {"images": images, "captions": read_shards(work, "captions")}, folder, codec,
                   global_spec=global_spec, fields=None if fields is None else {
                       f"img{i:07d}": fields(i) for i in range(n)})
    shutil.rmtree(work)
    (folder / "synthetic.json").write_text(json.dumps(spec))
    return folder
