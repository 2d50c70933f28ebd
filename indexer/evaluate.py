"""``alignsearch eval``: index a captioned split, then query it through the search pipeline the service uses.

Recall is counted as the papers count it (see :mod:`models.evaluation`). The three modes are three settings of
the same :class:`~indexer.search.Searcher`: ``global`` ranks by the FAISS first stage alone, ``exhaustive``
reranks every item (candidates = the collection), ``two-stage`` reranks the top ``candidates``; a ground
truth outside the candidates is a miss.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from alignsearch.models.data import load_dataset, select_split
from alignsearch.models.evaluation import recall_metrics
from alignsearch.models.model import AlignModel
from alignsearch.models.precomputed import FeatureFolder, encode_arrays

from .build import BuildOptions, build
from .index import Index, discard_stores
from .search import Searcher


def _score_matrix(results, n_rows: int, n_cols: int, column_of: dict[str, int], use_global: bool) -> torch.Tensor:
    """Queries x items, -inf where an item was not returned."""
    scores = torch.full((n_rows, n_cols), float("-inf"))
    for q, res in enumerate(results):
        for hit in res.hits:
            if hit.id in column_of:  # a caption left out of the evaluation (its image was skipped) is no item
                scores[q, column_of[hit.id]] = hit.global_score if use_global else hit.score
    return scores


def evaluate_split(model: AlignModel, dataset: Path, images_dir: Path | None, split: str = "test",
                   candidates: int = 20, val_size: int = 100, seed: int = 0, progress: bool = True,
                   local_codec: str = "SQfp16", limit: int | None = None, store: dict | None = None,
                   features: Path | None = None) -> dict:
    """Build a temporary index of ``split`` with ``model`` and measure the three modes through the Searcher.

    ``local_codec`` is the local store's FAISS codec; ``limit`` keeps only the first images (quick runs);
    ``store`` holds build options that pick other store backends (``--store qdrant``: the temporary
    collections are dropped at the end); ``features``: the photos are precomputed region features
    (:mod:`models.precomputed`), read from there for the index and for the image queries."""
    if features is None and not images_dir.is_dir():
        raise FileNotFoundError(f"images folder not found: {images_dir}")
    records = select_split(load_dataset(dataset), split, val_size, seed)[:limit]
    with tempfile.TemporaryDirectory(prefix="alignsearch-eval-") as tmp:
        captions = Path(tmp) / "captions.jsonl"
        captions.write_text("".join(json.dumps({"image": r.filename, "caption": c}) + "\n"
                                    for r in records for c in r.captions))
        report = build(model, BuildOptions(images=images_dir, features=features, out=Path(tmp) / "index", captions=captions,
                                           files=[r.filename for r in records], progress=progress,
                                           **{"local_codec": local_codec, **(store or {})}))
        try:
            return _measure(model, Path(tmp) / "index", candidates, progress, report, features)
        finally:
            discard_stores(Path(tmp) / "index")


def _measure(model: AlignModel, folder: Path, candidates: int, progress: bool, report: dict,
             features: Path | None = None) -> dict:
    """The three modes' recall on the index in ``folder`` (see :func:`evaluate_split`)."""
    searcher = Searcher(Index(folder), model)
    index = searcher.index
    image_ids = [r["id"] for r in index.conn.execute("SELECT id FROM images ORDER BY row")]
    image_col = {i: n for n, i in enumerate(image_ids)}
    all_captions = index.conn.execute("SELECT id, text, image_id FROM captions ORDER BY row").fetchall()
    # captions whose image could not be indexed have no ground truth: they are left out (and reported)
    cap_rows = [r for r in all_captions if r["image_id"] in image_col]
    dropped = len(all_captions) - len(cap_rows)
    caption_col = {r["id"]: n for n, r in enumerate(cap_rows)}
    text_to_image = torch.tensor([image_col[r["image_id"]] for r in cap_rows])
    n_img, n_cap = len(image_ids), len(cap_rows)
    texts = [r["text"] for r in cap_rows]

    def t2i(k: int) -> list:
        out = []
        for start in tqdm(range(0, n_cap, 128), desc=f"text queries (K={k})", disable=not progress):
            out += searcher.search_text(texts[start : start + 128], k=k, candidates=k)
        return out

    regions = FeatureFolder(features) if features is not None else None

    def i2t(k: int) -> list:
        from alignsearch.models.preprocess import load_image

        out = []
        for start in tqdm(range(0, n_img, 32), desc=f"image queries (K={k})", disable=not progress):
            ids = image_ids[start : start + 32]
            if regions is None:
                out += searcher.search_image([load_image(index.images_root / i) for i in ids], k=k, candidates=k)
            else:  # the photos' precomputed regions, read as the build read them
                enc = encode_arrays(model, [regions.read(regions.find(i)) for i in ids])
                out += searcher.search_image_encoded(enc, k, k)
        return out

    full_t2i, full_i2t = t2i(n_img), i2t(len(all_captions))  # every item, dropped ones too
    cut_t2i, cut_i2t = t2i(min(candidates, n_img)), i2t(min(candidates, n_cap))

    def metrics(t2i_res, i2t_res, use_global: bool) -> dict[str, float]:
        t2i_scores = _score_matrix(t2i_res, n_cap, n_img, image_col, use_global)
        i2t_scores = _score_matrix(i2t_res, n_img, n_cap, caption_col, use_global).T
        return recall_metrics(t2i_scores, text_to_image, i2t_scores)

    results = {
        "global": metrics(full_t2i, full_i2t, use_global=True),
        "exhaustive": metrics(full_t2i, full_i2t, use_global=False),
        "two-stage": metrics(cut_t2i, cut_i2t, use_global=False),
    }
    sizes = index.info()
    skipped = [s["item"] for s in report["skipped"]]
    if dropped:
        skipped.append(f"{dropped} caption(s) whose image was skipped: left out of the evaluation")
    return {"results": results, "images": n_img, "captions": n_cap, "captions_dropped": dropped,
            "skipped": skipped, "rerank_kernel": searcher.kernel_choice.kernel,
            "bytes_per_item": {name: sizes[name]["bytes_per_item"] for name in ("images", "captions")}}
