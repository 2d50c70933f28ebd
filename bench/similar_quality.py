"""How well "more like this" (``POST /search/similar``: photos ranked by the global image vector) finds related
photos, on Flickr8k's validation split.

``python -m alignsearch.bench.similar_quality [MODEL]`` encodes the 971 val photos, lets each query the other
970 by global cosine, and prints R@1/5/10 as JSON beside what a random ranking scores.

The definition, written before measuring: a photo's *subject words* are the content words (not in
:data:`models.words.STOPWORDS`, lower-cased, a final "s" dropped) that at least 2 of its 5 captions use; a
retrieved photo is relevant to the query when they share at least 2 subject words. R@K is the share of queries
with a relevant photo among their first K (the query itself left out); the random baseline is the same share
expected of a random ranking, computed exactly from each query's count of relevant photos.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .cli import SHARED_DATASET, model_report_main

FLICKR8K = SHARED_DATASET.parent / "flickr8k"
KS = (1, 5, 10)


def subject_words(captions: list[str]) -> set[str]:
    """The content words that at least 2 of ``captions`` use (lower-cased, a plural "s" dropped)."""
    from alignsearch.models.words import STOPWORDS

    counts: Counter[str] = Counter()
    for caption in captions:
        words = {w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
                 for w in re.findall(r"[a-z]+", caption.lower()) if w not in STOPWORDS}
        counts.update(words)
    return {w for w, n in counts.items() if n >= 2}


def relevance(words: list[set[str]], shared: int = 2) -> np.ndarray:
    """n x n booleans: photos i and j (i != j) share ``shared`` or more subject words."""
    n = len(words)
    rel = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(i + 1, n):
            rel[i, j] = rel[j, i] = len(words[i] & words[j]) >= shared
    return rel


def recall(scores: np.ndarray, rel: np.ndarray, ks=KS) -> dict[str, float]:
    """R@K of ranking by ``scores`` (n x n, the diagonal ignored) and a random ranking's expected R@K."""
    n = len(scores)
    s = scores.astype(np.float64).copy()
    np.fill_diagonal(s, -np.inf)
    order = np.argsort(-s, axis=1)
    hits = np.take_along_axis(rel, order, axis=1)
    out: dict[str, float] = {}
    positives = rel.sum(1)
    for k in ks:
        out[f"r{k}"] = round(100.0 * float(hits[:, :k].any(1).mean()), 2)
        # P(no relevant among k drawn without replacement from n - 1, of which p relevant)
        miss = np.ones(n)
        for t in range(k):
            miss *= np.clip((n - 1 - positives - t) / (n - 1 - t), 0, 1)
        out[f"random_r{k}"] = round(100.0 * float((1 - miss).mean()), 2)
    return out


def report(model_name: str | None = None, folder: Path = FLICKR8K) -> dict[str, Any]:
    from alignsearch.models.factory import load_model

    data = json.loads((folder / "dataset_flickr8k.json").read_text())
    val = [im for im in data["images"] if im["split"] == "val"]
    if not val:
        raise FileNotFoundError(f"no val split in {folder / 'dataset_flickr8k.json'}")
    model = load_model(model_name, device="cpu")
    from PIL import Image

    vectors = []
    for start in range(0, len(val), 32):
        images = [Image.open(folder / "images" / im["filename"]).convert("RGB") for im in val[start:start + 32]]
        vectors.append(model.encode_images(images).global_emb.float().numpy())
    g = np.concatenate(vectors)
    rel = relevance([subject_words([s["raw"] for s in im["sentences"]]) for im in val])
    return {"photos": len(val), "queries_with_a_relevant_photo": int(rel.any(1).sum()),
            "global_vectors": recall(g @ g.T, rel)}


def main(argv: list[str] | None = None) -> int:
    return model_report_main(argv, "similar_quality", "needs ../shared/datasets/flickr8k", report)


if __name__ == "__main__":
    raise SystemExit(main())
