"""How far apart the image backbone puts the two copies of the same photo that ``../shared`` holds: Flickr8k's
224 x 224 copy (aspect squashed) and Flickr8k-800's true-aspect copy (200 px long side).

``python -m alignsearch.bench.squash [MODEL]`` encodes the 800 photos that both data sets hold, both ways, and
prints as JSON: the cosine of the two copies' pooled backbone features and of their per-region features (cell by
cell), beside the same measures between *different* photos (the scale of "far"), and how often a squashed
copy's nearest true-aspect copy, by pooled feature, is its own photo (R@1 among 800). The model squashes every
photo to its square input, so the two copies differ by resampling and JPEG re-encoding, not by geometry; a
figure near the different-photo baseline would say the squashed set teaches the heads another world.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .cli import SHARED_DATASET, model_report_main

FULL = SHARED_DATASET.parent / "flickr8k"


def _features(model, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    from alignsearch.models.features import image_features

    feats, failures = image_features(model, paths, None)
    if failures:
        raise ValueError(f"{len(failures)} photos failed to decode, the first: {failures[0][0]}")
    return feats.pooled.float().numpy(), feats.tokens.float().numpy()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def report(model_name: str | None = None, true_aspect: Path = SHARED_DATASET, squashed: Path = FULL) -> dict[str, Any]:
    from alignsearch.models.factory import load_model

    names = sorted(p.name for p in (true_aspect / "images").iterdir()
                   if (squashed / "images" / p.name).is_file())
    if not names:
        raise FileNotFoundError(f"no photo is in both {true_aspect / 'images'} and {squashed / 'images'}")
    model = load_model(model_name, device="cpu")
    pooled_t, cells_t = _features(model, [true_aspect / "images" / n for n in names])
    pooled_s, cells_s = _features(model, [squashed / "images" / n for n in names])
    pt, ps = _unit(pooled_t), _unit(pooled_s)
    same = (pt * ps).sum(-1)
    rng = np.random.default_rng(0)
    other = rng.permutation(len(names))
    other = np.where(other == np.arange(len(names)), (other + 1) % len(names), other)
    different = (pt[other] * ps).sum(-1)
    cell_same = (_unit(cells_t) * _unit(cells_s)).sum(-1).mean(-1)
    cell_different = (_unit(cells_t[other]) * _unit(cells_s)).sum(-1).mean(-1)
    nearest = (ps @ pt.T).argmax(1)
    return {
        "photos": len(names),
        "pooled_cosine": {"same_photo_mean": round(float(same.mean()), 4), "same_photo_p5": round(float(np.percentile(same, 5)), 4),
                          "different_photos_mean": round(float(different.mean()), 4)},
        "region_cosine": {"same_photo_mean": round(float(cell_same.mean()), 4),
                          "different_photos_mean": round(float(cell_different.mean()), 4)},
        "squashed_finds_its_true_aspect_copy_r1": round(100.0 * float((nearest == np.arange(len(names))).mean()), 2),
    }


def main(argv: list[str] | None = None) -> int:
    return model_report_main(argv, "squash", "needs ../shared/datasets/flickr8k and flickr8k-800", report)


if __name__ == "__main__":
    raise SystemExit(main())
