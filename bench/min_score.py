"""Choose a model's ``min_score``: the global score below which a hit is no match (issue 9, "nothing matches").

``python -m alignsearch.bench.min_score [MODEL] [--write]`` encodes the Flickr8k-800 *train* images (the 600 training
and the 100 validation images: never ``test``) and their captions, and a fixed set of nonsense strings
(random letters, repeated letters, keyboard runs, digits). Every nonsense string is searched against all 700
images; ``min_score`` is the 99th percentile of their best global score, rounded up to 0.01, so that 99% of
nonsense queries return nothing above it. The report says what real captions keep at that threshold: the
share whose best image clears it, and the share of right images found in the top 5 that clear it.
``--write`` stores it as ``calibration.json`` in the model folder, where :class:`indexer.search.Searcher`
reads its default (the file is not part of the model's fingerprint).

The global score (cosine of the query's and the image's global vectors) is used, not the fused score: the
fused score adds ``w * S_local`` with MrSw's *sum* over word pieces, which grows with the query's length
for nonsense too, so no single threshold on it separates nonsense from captions.
"""

from __future__ import annotations

import json
import math
import random
import string
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .cli import DEFAULT_DATASET

QUANTILE = 0.99
KEYBOARD = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def nonsense_queries(n: int = 500, seed: int = 0) -> list[str]:
    """``n`` nonsense strings, the same for a seed: random letters, repeated letters, keyboard runs, digits."""
    rng = random.Random(seed)

    def letters() -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))

    def repeated() -> str:
        return rng.choice(string.ascii_lowercase) * rng.randint(2, 6)

    def keyboard() -> str:
        row = rng.choice(KEYBOARD)
        start = rng.randrange(len(row) - 2)
        return row[start : start + rng.randint(3, len(row) - start)]

    def digits() -> str:
        return "".join(rng.choice(string.digits) for _ in range(rng.randint(2, 8)))

    makers = (letters, repeated, keyboard, digits)
    out = []
    for i in range(n):
        make = makers[i % len(makers)]
        out.append(" ".join(make() for _ in range(rng.randint(1, 5))))
    return out


def choose_min_score(nonsense_best: Sequence[float], quantile: float = QUANTILE) -> float:
    """The ``quantile`` of the nonsense queries' best scores, rounded up to 0.01."""
    if len(nonsense_best) == 0:
        raise ValueError("no nonsense scores")
    return math.ceil(float(np.quantile(np.asarray(nonsense_best, dtype=np.float64), quantile)) * 100 - 1e-9) / 100


def kept(real_scores: np.ndarray, right: np.ndarray, threshold: float, k: int = 5) -> dict[str, float]:
    """What real queries keep at ``threshold``: ``real_scores`` queries x images (global), ``right`` the
    column of each query's image. Percent whose best image clears it, and percent of the right images ranked
    in the top ``k`` that clear it."""
    best = real_scores.max(1)
    right_scores = real_scores[np.arange(len(right)), right]
    rank = (real_scores > right_scores[:, None]).sum(1)
    in_top = rank < k
    return {
        "best_hit_kept": round(100.0 * float((best >= threshold).mean()), 2),
        f"right_in_top{k}_kept": round(100.0 * float((right_scores[in_top] >= threshold).mean()), 2)
        if in_top.any() else 0.0,
    }


def calibrate(model, dataset: Path = DEFAULT_DATASET, n_nonsense: int = 500) -> dict[str, Any]:
    """Encode the train/validation images and captions and the nonsense strings; choose ``min_score``."""
    from alignsearch.models.data import load_dataset, select_split
    from alignsearch.models.preprocess import load_image

    all_records = load_dataset(dataset / "dataset_flickr8k.json")
    parts = {split: select_split(all_records, split) for split in ("train", "val")}  # never "test"
    records = parts["train"] + parts["val"]
    images = model.encode_images([load_image(dataset / "images" / r.filename) for r in records])
    gallery = images.global_emb.numpy()
    captions = [(c, i) for i, r in enumerate(records) for c in r.captions]
    real = model.encode_texts([c for c, _ in captions]).global_emb.numpy() @ gallery.T
    nonsense = model.encode_texts(nonsense_queries(n_nonsense)).global_emb.numpy() @ gallery.T
    nonsense_best = nonsense.max(1)
    threshold = choose_min_score(nonsense_best)
    right = np.array([i for _, i in captions])
    is_val = right >= len(parts["train"])
    return {
        "min_score": threshold,
        "on": "global_score",
        "chosen_on": f"{len(records)} Flickr8k-800 train/validation images, {len(captions)} captions, "
                     f"{n_nonsense} nonsense strings (seed 0); the {QUANTILE:.0%} quantile of the nonsense "
                     "strings' best global score, rounded up to 0.01",
        "nonsense_above": round(100.0 * float((nonsense_best >= threshold).mean()), 2),
        "validation_captions": kept(real[is_val], right[is_val], threshold),  # held out from training
        "train_captions": kept(real[~is_val], right[~is_val], threshold),
        "model_fingerprint": model.fingerprint,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    write = "--write" in argv
    argv = [a for a in argv if a != "--write"]
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("usage: python -m alignsearch.bench.min_score [MODEL] [--write]", file=sys.stderr)
        return 2
    from alignsearch.models.factory import load_model

    try:
        model = load_model(argv[0] if argv else None)
        report = calibrate(model)
    except (OSError, ValueError) as exc:  # no model or data set there (DatasetError is a ValueError)
        print(f"bench.min_score: error: {exc}", file=sys.stderr)
        return 2
    if write:
        (Path(model.source) / "calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
