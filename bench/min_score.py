"""Calibrate a model's match signal: build its reference bank and choose the reference test's rules.

``python -m alignsearch.bench.min_score [MODEL] [--write] [--flickr8k DIR] [--cache-dir DIR]``

**The bank** (:mod:`models.reference`): the global vectors of ``REFERENCE_SIZE`` (1,000) photos drawn (seed 0)
from Flickr8k's ``train`` split, and of one caption of each (drawn with the same seed). Never ``val``, ``test``
or ``test800``, and never a photo that is also in Flickr8k-800 (the package set's distractors, the shipped
model's training photos).

**The test** for each side is a per-query threshold on a hit's global score (so ``match`` is always
``global_score >= min_score``, as the API says), built from two kinds of evidence:

- the *reference* evidence: the query's global scores against the bank (reference photos for a text query,
  reference captions for an image query): their ``q`` quantile (``RQ``: threshold = quantile + margin ``m``),
  or their mean and standard deviation (``RZ``: threshold = mean + ``t`` sd);
- the *collection* evidence (``CG``): how far the hit stands out from the query's other scores in the same
  collection: threshold = ``g_M + d``, where ``g_M`` is the ``M``-th best global score of the collection (or
  of what a filter allows) for the query, ``M`` = ``COLLECTION_M`` (10; the lowest score when the collection
  holds fewer than ``M`` items, no collection evidence with a single item). The first stage always fetches at
  least ``M`` global scores, whatever ``candidates`` is, so ``g_M`` does not depend on a request's settings;
- the candidate families, fixed before any measurement: ``RQ`` (the earlier test), ``RZ``, ``CG``, ``RZ or CG``
  and ``RQ or CG`` (a hit matches when either threshold is cleared: the lower one), and ``LIN``: a linear rule
  ``a z + b gap >= c`` on ``z`` = (g - mean) / sd and ``gap`` = g - ``g_M``, whose direction (a, b) is fitted by
  a logistic regression on first hits (positives: right first hits of val and package, the package set
  weighted as much as all of val; negatives: the first hits of the nonsense strings in every collection below)
  and whose cut ``c`` is chosen by the rule below like the other families' parameters. Every family is a
  threshold on g for each query.

**Selection rule, written before any candidate was measured.** The data, none of it the demo:

- Flickr8k ``val`` (887 photos: the 971 less those also in Flickr8k-800; their 5 captions each) at three
  collection sizes: all of it (``V``), ``SUBSETS[100]`` random subsets of 100 photos (``V100``) and
  ``SUBSETS[16]`` random subsets of 16 photos (``V16``, the size of a small personal folder), seed 0; each searched
  the way the service searches (global top ``CANDIDATES``, reranked by the fused score). Text queries: the
  captions of the collection's photos (right first: the caption's photo ranks first); image queries: the
  photos, searched among the captions of the collection's photos (right first: one of its own captions ranks
  first);
- the package-photo set (``P``, :mod:`bench.package_photos`: 10 out-of-domain photos among 100 Flickr8k-800
  validation photos, 20 plain queries; right first: the query's photo ranks first);
- ``N_NONSENSE`` nonsense strings (:func:`nonsense_queries`, seed 0) searched in every photo collection above
  (``V``, each ``V100`` and ``V16`` subset, ``P``); for image queries ``NONSENSE_IMAGES`` generated non-photos
  (:func:`nonsense_images`, seed 0) searched in every caption collection (``V``, ``V100``, ``V16``).

"Flagged" means the test marks the hit as a match; a query has "no match" when none of its top ``TOP_K`` (10,
the API's default ``k``) is flagged. Rates over the subsets are pooled over their queries.

- text queries: among the tests whose nonsense no-match rate is >= ``NONSENSE_FLOOR`` (97%) on *each* of
  ``V``, ``V100``, ``V16`` and ``P``, the one with the highest ``flagged`` = mean of two: the package
  right-first hits flagged, and the mean over ``V``, ``V100``, ``V16`` of the val right-first hits flagged (so
  the 20 out-of-domain queries weigh as much as all of val);
- image queries: among the tests whose non-photo no-match rate is >= ``NONSENSE_FLOOR`` on each of ``V``,
  ``V100`` and ``V16``, the one with the highest mean over the three sizes of the val right-first captions
  flagged;
- ties (within 0.5 points of ``flagged``) go to the higher lowest no-match rate, then to the family with fewer
  parameters (``RQ``, ``RZ``, ``CG`` before the two-test ones before ``LIN``), then to the stricter thresholds.
  When no test meets the floor, the strictest ``RQ`` one (q = 1, the largest margin) is written and the report
  says so.

The demo (:mod:`bench.demo_quality`) checks the chosen rules once, afterwards; it never chooses.

``--write`` writes ``reference.safetensors`` and ``calibration.json`` (the rules and the figures) into the
model folder; neither is part of the model's fingerprint. Backbone features go through the training's feature
cache (``--cache-dir``, default ``~/.cache/alignsearch/features``), so a second model with the same backbones
(or a re-run) only runs the heads. A model folder without a bank (or calibrated before banks, with a fixed
``min_score``) still works: :meth:`indexer.search.Searcher.mark_matches` falls back to that ``min_score``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .cli import DEFAULT_DATASET

REFERENCE_SIZE = 1000
SEED = 0
CANDIDATES = 20  # the first stage's K, as `alignsearch eval` and the package set measure two-stage
TOP_K = 10  # the API's default k: "no match" means none of these is flagged
NONSENSE_FLOOR = 97.0
N_NONSENSE = 500
NONSENSE_IMAGES = 60
QUANTILES = (0.9, 0.95, 0.98, 0.99, 0.995, 1.0)
MARGINS = tuple(round(0.005 * i, 3) for i in range(31))  # 0 .. 0.15
Z_CUTS = tuple(round(0.1 * i, 1) for i in range(81))  # RZ: mean + t sd, t = 0 .. 8
GAPS = tuple(round(0.005 * i, 3) for i in range(61))  # CG: g_M + d, d = 0 .. 0.3
COLLECTION_M = 10  # the collection evidence's reference rank: the M-th best global score
SUBSETS = {100: 5, 16: 20}  # val subsets: photos per subset -> how many subsets (seed 0)
KEYBOARD = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
FLICKR8K = Path(os.environ.get("ALIGNSEARCH_FLICKR8K", DEFAULT_DATASET.parent / "flickr8k"))
CACHE_DIR = Path("~/.cache/alignsearch/features")


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


def nonsense_images(n: int = NONSENSE_IMAGES, seed: int = 0, size: int = 224) -> list:
    """``n`` generated non-photos, the same for a seed: flat colours, pixel noise, gradients, stripes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            pixels = np.broadcast_to(rng.integers(0, 256, 3), (size, size, 3))
        elif kind == 1:
            pixels = rng.integers(0, 256, (size, size, 3))
        elif kind == 2:
            a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            t = np.linspace(0, 1, size)[:, None, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[None, :, None]
            pixels = np.broadcast_to(a + (b - a) * t, (size, size, 3))
        else:
            a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            period = int(rng.integers(4, 40))
            stripes = (np.arange(size) // period % 2).astype(bool)
            grid = stripes[:, None] if rng.random() < 0.5 else stripes[None, :]
            pixels = np.where(np.broadcast_to(grid, (size, size))[..., None], a, b)
        out.append(Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)))
    return out


# -- the test and its measures (small arrays; the unit tests call these) -------------------------------------

def thresholds(reference: np.ndarray, quantile: float, margin: float) -> np.ndarray:
    """Per-query threshold from queries x R reference scores: their ``quantile`` plus ``margin``."""
    from alignsearch.models.reference import MatchRule

    return MatchRule(quantile, margin).threshold(reference)


@dataclass
class Ranked:
    """A collection searched by a set of queries: per query its top items (by the fused two-stage score) and
    their global scores, and its scores against the reference bank (queries x R, sorted)."""

    items: np.ndarray  # queries x k
    global_scores: np.ndarray  # queries x k
    reference: np.ndarray  # queries x R


def right_first_flagged(ranked: Ranked, right: Sequence[set[int]], quantile: float, margin: float) -> dict[str, Any]:
    """Of the queries whose first hit is right, the percent whose first hit is flagged; also the percent of
    wrong first hits flagged."""
    thr = thresholds(ranked.reference, quantile, margin)
    first_right = np.array([int(ranked.items[q, 0]) in right[q] for q in range(len(right))])
    flagged = ranked.global_scores[:, 0] >= thr
    return {"right_first": int(first_right.sum()),
            "right_first_flagged": _pct(flagged[first_right]),
            "wrong_first_flagged": _pct(flagged[~first_right])}


def no_match_rate(ranked: Ranked, quantile: float, margin: float) -> float:
    """Percent of queries none of whose top hits is flagged."""
    thr = thresholds(ranked.reference, quantile, margin)
    return _pct(~(ranked.global_scores >= thr[:, None]).any(1))


def _pct(mask: np.ndarray) -> float:
    return round(100.0 * float(np.mean(mask)), 2) if len(mask) else 0.0


def choose_rule(grid: list[dict[str, Any]], floor: float = NONSENSE_FLOOR) -> tuple[dict[str, Any], bool]:
    """The selection rule of the module docstring over rows ``{"quantile", "margin", "no_match", "flagged"}``
    (``no_match``: the lowest no-match rate over the negative sets; ``flagged``: the rate to maximise).
    Returns (the row, whether it met the floor)."""
    if not grid:
        raise ValueError("no candidate rules")
    ok = [r for r in grid if r["no_match"] >= floor]
    if not ok:
        return max(grid, key=lambda r: (r["quantile"], r["margin"])), False
    return min(ok, key=lambda r: (-r["flagged"], -r["no_match"], r["margin"], r["quantile"])), True


# -- two-stage search in memory -----------------------------------------------------------------------------

def two_stage(queries, items, query_is_text: bool, scoring, k: int = TOP_K, candidates: int = CANDIDATES,
              chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """What :class:`indexer.search.Searcher` returns, computed on encoder outputs held in memory: the top
    ``candidates`` items by global score, reranked by ``scoring``'s fused score (ties by item row). Returns
    (items, global scores), queries x k."""
    from alignsearch.models import alignment

    g = queries.global_emb.float() @ items.global_emb.float().T
    candidates = min(candidates, g.shape[1])
    k = min(k, candidates)
    top_g, top = g.topk(candidates, dim=1)
    out_items, out_g = [], []
    for s in range(0, len(top), chunk):
        rows = top[s : s + chunk]
        q = slice(s, s + len(rows))
        if query_is_text:  # words of the query against the regions of each candidate
            sims = torch.einsum("btd,bkrd->bktr", queries.local[q].float(), items.local[rows].float())
            word_mask, region_mask = queries.mask[q][:, None, :], items.mask[rows]
        else:  # words of each candidate caption against the regions of the query
            sims = torch.einsum("bktd,brd->bktr", items.local[rows].float(), queries.local[q].float())
            word_mask, region_mask = items.mask[rows], queries.mask[q][:, None, :]
        local = alignment.pair_scores(sims, word_mask, region_mask, scoring.alignment, scoring.lse_lambda)
        fused = scoring.fuse(top_g[q], local).numpy()
        for b in range(len(rows)):
            order = np.lexsort((rows[b].numpy(), -fused[b]))[:k]
            out_items.append(rows[b].numpy()[order])
            out_g.append(top_g[q][b].numpy()[order])
    return np.stack(out_items), np.stack(out_g)


# -- the data ---------------------------------------------------------------------------------------------

def reference_records(flickr8k: Path, exclude: set[str], size: int = REFERENCE_SIZE, seed: int = SEED):
    """(photo file names, one caption each) of the bank: ``size`` train photos outside ``exclude``."""
    from alignsearch.models.data import load_dataset, select_split

    train = [r for r in select_split(load_dataset(flickr8k / "dataset_flickr8k.json"), "train")
             if r.filename not in exclude]
    rng = random.Random(seed)
    picked = rng.sample(train, min(size, len(train)))
    return [r.filename for r in picked], [rng.choice(r.captions) for r in picked]


def _encode_images(model, paths: list[Path], cache_dir: Path | None):
    from alignsearch.models.features import image_features
    from alignsearch.models.train import encode_cached

    feats, failures = image_features(model, paths, cache_dir, workers=2)
    if failures:
        raise OSError(f"{len(failures)} photo(s) could not be decoded, e.g. {failures[0][0]}")
    return encode_cached(model, feats, torch.arange(len(paths)), image=True)


def _encode_texts(model, texts: list[str], cache_dir: Path | None):
    from alignsearch.models.features import text_features
    from alignsearch.models.train import encode_cached

    if getattr(model, "joint", None) is not None:  # a joint backbone has no separate text features
        return model.encode_texts(texts)
    return encode_cached(model, text_features(model, texts, cache_dir), torch.arange(len(texts)), image=False)


def calibrate(model, flickr8k: Path = FLICKR8K, flickr8k_800: Path = DEFAULT_DATASET,
              cache_dir: Path | None = CACHE_DIR) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Encode the bank and the calibration sets, measure the grid and choose the rules. Returns (the
    calibration report, the bank's photo vectors, its caption vectors)."""
    from alignsearch.models.data import load_dataset, select_split
    from alignsearch.models.reference import ReferenceBank

    from .package_photos import load_spec, package_folders

    for folder in (flickr8k, flickr8k_800):
        if not (folder / "dataset_flickr8k.json").is_file():
            raise FileNotFoundError(f"no dataset_flickr8k.json in {folder} (set ALIGNSEARCH_FLICKR8K and "
                                    "ALIGNSEARCH_DATASET to the Flickr8k and Flickr8k-800 folders)")
    small = load_dataset(flickr8k_800 / "dataset_flickr8k.json")
    exclude = {r.filename for r in small}
    ref_files, ref_captions = reference_records(flickr8k, exclude)
    val = [r for r in select_split(load_dataset(flickr8k / "dataset_flickr8k.json"), "val") if r.filename not in exclude]
    photos, queries = load_spec()
    folders = package_folders()
    distractors = select_split(small, "val")
    package_paths = [folders[pkg] / name for name, pkg in photos.items()] + \
                    [flickr8k_800 / "images" / r.filename for r in distractors]
    cache_dir = cache_dir.expanduser() if cache_dir else None

    images = _encode_images(model, [flickr8k / "images" / f for f in ref_files + [r.filename for r in val]], cache_dir)
    val_captions = [c for r in val for c in r.captions]
    texts = _encode_texts(model, ref_captions + val_captions, cache_dir)
    nonsense = nonsense_queries(N_NONSENSE, SEED)
    asked = _encode_texts(model, nonsense + list(queries), cache_dir)
    package = _encode_images(model, package_paths, cache_dir)
    fake = model.encode_images(nonsense_images())

    n_ref = len(ref_files)
    bank = ReferenceBank(images.global_emb[:n_ref].float().numpy(), texts.global_emb[:n_ref].float().numpy())
    val_images, val_texts = images.select(range(n_ref, len(images))), texts.select(range(n_ref, len(texts)))
    nonsense_enc, plain_enc = asked.select(range(len(nonsense))), asked.select(range(len(nonsense), len(asked)))
    scoring = model.config.scoring()

    def search(q, items, query_is_text: bool) -> Ranked:
        found, g = two_stage(q, items, query_is_text, scoring)
        return Ranked(found, g, bank.scores(q.global_emb.float().numpy(), query_is_text))

    caption_image = np.array([i for i, r in enumerate(val) for _ in r.captions])
    t2i = search(val_texts, val_images, True)
    t2i_right = [{int(i)} for i in caption_image]
    names = list(photos)
    pkg = search(plain_enc, package, True)
    pkg_right = [{names.index(p) for p in expected} for expected in queries.values()]
    nonsense_val, nonsense_pkg = search(nonsense_enc, val_images, True), search(nonsense_enc, package, True)
    i2t = search(val_images, val_texts, False)
    i2t_right = [set(np.flatnonzero(caption_image == i).tolist()) for i in range(len(val))]
    fake_val = search(fake, val_texts, False)
    pkg_photos_val = search(package.select(range(len(photos))), val_texts, False)

    text_grid, image_grid = [], []
    for q in QUANTILES:
        for m in MARGINS:
            v, p = right_first_flagged(t2i, t2i_right, q, m), right_first_flagged(pkg, pkg_right, q, m)
            nv, npkg = no_match_rate(nonsense_val, q, m), no_match_rate(nonsense_pkg, q, m)
            text_grid.append({"quantile": q, "margin": m, "no_match": min(nv, npkg),
                              "flagged": round((v["right_first_flagged"] + p["right_first_flagged"]) / 2, 2),
                              "val": v, "package": p, "nonsense_no_match": {"val": nv, "package": npkg}})
            iv = right_first_flagged(i2t, i2t_right, q, m)
            nf = no_match_rate(fake_val, q, m)
            image_grid.append({"quantile": q, "margin": m, "no_match": nf, "flagged": iv["right_first_flagged"],
                               "val": iv, "non_photos_no_match": nf,
                               "package_photos_no_match": no_match_rate(pkg_photos_val, q, m)})
    text_rule, text_ok = choose_rule(text_grid)
    image_rule, image_ok = choose_rule(image_grid)

    def trimmed(row: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k not in ("quantile", "margin", "no_match", "flagged")}

    report = {
        "match": {"text": {"quantile": text_rule["quantile"], "margin": text_rule["margin"]},
                  "image": {"quantile": image_rule["quantile"], "margin": image_rule["margin"]}},
        "on": "global_score",
        "reference": {"photos": n_ref, "captions": n_ref, "from": "Flickr8k train (not in Flickr8k-800), "
                      f"seed {SEED}, one caption per photo"},
        "chosen_on": f"Flickr8k val ({len(val)} photos, {len(val_captions)} captions), the package-photo set "
                     f"({len(package_paths)} photos, {len(queries)} queries), {N_NONSENSE} nonsense strings and "
                     f"{NONSENSE_IMAGES} generated non-photos (seed {SEED}); top {TOP_K} of two-stage "
                     f"(K={CANDIDATES}); the rule of bench/min_score.py's docstring (no-match floor "
                     f"{NONSENSE_FLOOR}%)",
        "floor_met": {"text": text_ok, "image": image_ok},
        "text_queries": trimmed(text_rule),
        "image_queries": trimmed(image_rule),
        "model_fingerprint": model.fingerprint,
    }
    if model.calibration.get("min_score") is not None:  # what the fixed threshold before the bank did here
        old = float(model.calibration["min_score"])
        report["fixed_min_score_before"] = {
            "min_score": old,
            "val_right_first_flagged": _pct(t2i.global_scores[[i for i, r in enumerate(t2i_right)
                                                               if int(t2i.items[i, 0]) in r], 0] >= old),
            "package_right_first_flagged": _pct(pkg.global_scores[[i for i, r in enumerate(pkg_right)
                                                                   if int(pkg.items[i, 0]) in r], 0] >= old),
            "nonsense_no_match_val": _pct(~(nonsense_val.global_scores >= old).any(1)),
            "nonsense_no_match_package": _pct(~(nonsense_pkg.global_scores >= old).any(1))}
    report["grid"] = {"text": [_row(r) for r in text_grid], "image": [_row(r) for r in image_grid]}
    return report, bank.images, bank.captions


def _row(r: dict[str, Any]) -> list:
    return [r["quantile"], r["margin"], r["no_match"], r["flagged"]]


def write(folder: Path, report: dict[str, Any], images: np.ndarray, captions: np.ndarray) -> None:
    """``reference.safetensors`` and ``calibration.json`` into the model folder (each written atomically)."""
    from alignsearch.models.reference import save_reference

    save_reference(folder, images, captions, {"from": report["reference"]["from"]})
    tmp = folder / ".calibration.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / "calibration.json")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise ValueError(f"{message} (see --help)")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m alignsearch.bench.min_score",
                                description="Build a model's reference bank and choose its match rules.")
    p.add_argument("model", nargs="?", default=None, help="model folder or shipped name (default: the default)")
    p.add_argument("--write", action="store_true", help="write reference.safetensors + calibration.json there")
    p.add_argument("--flickr8k", type=Path, default=FLICKR8K, help=f"Flickr8k folder (default {FLICKR8K})")
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="backbone feature cache (as train's)")
    p.add_argument("--device", default="auto")
    from alignsearch.models.factory import load_model

    try:
        args = p.parse_args(argv)
        model = load_model(args.model, device=args.device)
        report, images, captions = calibrate(model, args.flickr8k, DEFAULT_DATASET, args.cache_dir)
    except (OSError, ValueError, ImportError) as exc:  # no model, data set or package there
        print(f"bench.min_score: error: {exc}", file=sys.stderr)
        return 2
    if args.write:
        write(Path(model.source), report, images, captions)
    print(json.dumps({k: v for k, v in report.items() if k != "grid"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
