"""The Qdrant store against FAISS on one data set: ``python -m alignsearch.bench.qdrant [--images DIR --captions FILE]``
(default: the shared Flickr8k-800 set) prints JSON with

- equality: text -> images and image -> captions top-10 and the largest score difference, Qdrant (embedded) vs
  FAISS with a Flat global index and the lossless ``Flat`` local codec (the items are encoded once and
  assembled into both indexes);
- bytes per image: the Qdrant collection's folder on disk over its images, beside the FAISS index's files;
- text -> images latency of the store part (coarse + rerank, queries encoded beforehand), warm: after a
  warm-up, one query at a time, with the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from alignsearch.indexer import layout, qdrant_store
from alignsearch.indexer.assemble import assemble_index
from alignsearch.indexer.build import BuildOptions, encode_all
from alignsearch.indexer.caption_ids import caption_items
from alignsearch.indexer.index import Index
from alignsearch.indexer.reader import list_images, read_captions
from alignsearch.indexer.search import Searcher
from alignsearch.models.model import AlignModel


def build_pair(model: AlignModel, images: Path, captions: Path, root: Path, quantization: str = "none"
               ) -> tuple[Path, Path]:
    """Encode ``images`` and ``captions`` once; assemble a FAISS index (``Flat`` / ``Flat``) and a Qdrant one
    (embedded, under ``root/qdrant``) from the same shards. Returns their folders."""
    rows = read_captions(captions)
    options = BuildOptions(images=images, out=root / "faiss", captions=captions, progress=False)
    shards = encode_all(model, options, list_images(images), root / "shards", images,
                        lambda known: caption_items(rows, known))
    faiss_dir, qdrant_dir = root / "faiss", root / "qdrant-index"
    for folder in (faiss_dir, qdrant_dir):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    assemble_index(faiss_dir, model, shards, images.resolve(), "Flat", "Flat")
    settings = qdrant_store.QdrantSettings(path=str(root / "qdrant"))
    assemble_index(qdrant_dir, model, shards, images.resolve(), quantization, qdrant_store.NAME,
                   backend=qdrant_store.QdrantGlobalBackend(settings), local=qdrant_store.QdrantLocalBackend(settings))
    shutil.rmtree(root / "shards", ignore_errors=True)
    return faiss_dir, qdrant_dir


def differences(expected: list, got: list) -> dict[str, Any]:
    """How two lists of search results differ: queries whose top ids differ, and the largest score gap."""
    same = sum([h.id for h in a.hits] == [h.id for h in b.hits] for a, b in zip(expected, got))
    gap = max((abs(x.score - y.score) for a, b in zip(expected, got) for x, y in zip(a.hits, b.hits)), default=0.0)
    return {"queries": len(expected), "same_top_ids": same, "max_score_difference": float(gap)}


def disk_bytes(index: Path) -> dict[str, dict[str, float]]:
    """Bytes per item allocated on disk by each collection's stores: the files in the index folder, and for
    Qdrant its collection's segments and write-ahead log."""
    out = {}
    opened = Index(index, check="none", use_gpu=False)
    for name, col in opened.collections.items():
        parts = {"index_folder": sum(p.stat().st_blocks * 512 for p in (index / name).rglob("*") if p.is_file()),
                 **(getattr(col.store, "disk_bytes", lambda: None)() or {})}
        out[name] = {part: round(n / max(len(col.store), 1), 1) for part, n in parts.items()}
    return out


def latency_ms(searcher: Searcher, texts: list[str], warmup: int, k: int = 10, candidates: int = 100) -> dict:
    """Median and p90 of the store part of text -> images (one query at a time, encoded beforehand)."""
    encoded = [searcher.model.encode_texts([t]) for t in texts]
    for enc in encoded[:warmup]:
        searcher.search_text_encoded(enc, k, candidates)
    times = []
    for enc in encoded[warmup:]:
        start = time.perf_counter()
        searcher.search_text_encoded(enc, k, candidates)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"queries": len(times), "median": round(statistics.median(times), 2),
            "p90": round(times[int(0.9 * (len(times) - 1))], 2)}


def main(argv: list[str] | None = None) -> int:
    dataset = Path(os.environ.get("ALIGNSEARCH_DATASET", "../shared/datasets/flickr8k-800"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=Path, default=dataset / "images")
    p.add_argument("--captions", type=Path, default=dataset / "captions.csv")
    p.add_argument("--work", type=Path, default=Path("/tmp/alignsearch-bench-qdrant"))
    p.add_argument("--queries", type=int, default=300, help="text queries timed (after 30 of warm-up)")
    args = p.parse_args(argv)
    from alignsearch.models import load_model

    model = load_model(None, device="cpu")
    if not (args.work / "qdrant-index" / layout.MANIFEST).is_file():
        build_pair(model, args.images, args.captions, args.work)
    faiss_dir, qdrant_dir = args.work / "faiss", args.work / "qdrant-index"
    reference, searcher = Searcher(Index(faiss_dir), model), Searcher(Index(qdrant_dir), model)
    texts = [r[0] for r in reference.index.conn.execute("SELECT text FROM captions ORDER BY row")]
    texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))[: args.queries + 30]]
    report: dict[str, Any] = {"equality_t2i": differences(reference.search_text(texts[:200], k=10, candidates=100),
                                                          searcher.search_text(texts[:200], k=10, candidates=100))}
    from alignsearch.models.preprocess import load_image

    files = [reference.index.images_root / r[0] for r in reference.index.conn.execute("SELECT path FROM images")]
    photos = [load_image(f) for f in files[::16]]
    report["equality_i2t"] = differences(reference.search_image(photos, k=10, candidates=100),
                                         searcher.search_image(photos, k=10, candidates=100))
    report["bytes_per_item_on_disk"] = {"faiss": disk_bytes(faiss_dir), "qdrant": disk_bytes(qdrant_dir)}
    report["load_before"] = os.getloadavg()
    report["latency_ms"] = {name: latency_ms(s, texts, 30) for name, s in (("faiss", reference), ("qdrant", searcher),
                                                                            ("faiss_again", reference))}
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
