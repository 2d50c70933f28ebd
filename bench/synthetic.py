"""A synthetic index of N images (random normalised vectors, R regions each) for speed measurements.

Written with the indexer's own files and codecs, so the Searcher reads it like any index; the captions
collection holds one placeholder. Vectors are generated and encoded in chunks, so 100k x 49 regions fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np

from indexer import faiss_index, layout, local_store, metadata
from indexer.build import model_fields
from models.model import AlignModel

CHUNK = 5_000


def _normalised(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_synthetic_index(folder: Path, model: AlignModel, n: int, regions: int = 49, codec: str = "SQfp16",
                          seed: int = 0) -> Path:
    """Create (or reuse, when its manifest says the same) a synthetic index at ``folder``."""
    spec = {"n": n, "regions": regions, "codec": codec, "seed": seed, "model": model.fingerprint}
    if (folder / "synthetic.json").is_file() and json.loads((folder / "synthetic.json").read_text()) == spec:
        return folder
    dim = model.embed_dim
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    coder = local_store.make_codec(dim, codec, _normalised(rng, (20_000, dim)))
    codes = np.lib.format.open_memmap(images / layout.CODES_FILE, mode="w+", dtype=np.uint8,
                                      shape=(n * regions, coder.sa_code_size()))
    global_vectors = np.empty((n, dim), np.float32)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        local = _normalised(rng, (stop - start, regions, dim))
        g = local.mean(1)
        global_vectors[start:stop] = g / np.linalg.norm(g, axis=-1, keepdims=True)
        codes[start * regions : stop * regions] = coder.sa_encode(local.reshape(-1, dim))
    codes.flush()
    del codes
    faiss.write_index(coder, str(images / layout.CODEC_FILE))
    np.save(images / layout.OFFSETS_FILE, np.arange(n + 1, dtype=np.int64) * regions)
    factory = "Flat"
    faiss_index.write(faiss_index.build_global_index(global_vectors, np.arange(n), factory), images / layout.GLOBAL_FILE)
    captions = folder / "captions"
    one = _normalised(rng, (1, 4, dim))
    local_store.write_store(captions, coder, coder.sa_encode(one.reshape(-1, dim)), np.array([4]))
    faiss_index.write(faiss_index.build_global_index(one.mean(1) / np.linalg.norm(one.mean(1)), np.arange(1), "Flat"),
                      captions / layout.GLOBAL_FILE)
    db = folder / layout.METADATA
    db.unlink(missing_ok=True)
    conn = metadata.connect(db)
    conn.executemany("INSERT INTO images(row, id, path, width, height) VALUES (?, ?, ?, 224, 224)",
                     ((i, f"img{i:07d}", f"img{i:07d}.jpg") for i in range(n)))
    metadata.insert_captions(conn, 0, [metadata.CaptionItem("caption-1", "placeholder", None)])
    metadata.close_for_checksum(conn)
    layout.write_manifest(folder, {
        "model": model_fields(model), "images_root": str(folder), "local_codec": codec,
        "collections": {"images": {"factory": factory, "type": "IndexFlat", "items": n},
                        "captions": {"factory": factory, "type": "IndexFlat", "items": 1}},
        "counts": {"images": n, "captions": 1, "images_deleted": 0, "captions_deleted": 0},
    })
    (folder / "synthetic.json").write_text(json.dumps(spec))
    return folder
