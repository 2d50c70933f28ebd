"""Calibrate a model's match signal: build its reference bank and choose its match test for each side.

``python -m alignsearch.bench.min_score [MODEL] [--write] [--flickr8k DIR] [--cache-dir DIR] [--sets FILE]``

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
(or a re-run) only runs the heads. ``--sets FILE`` keeps the searched calibration sets (a pickle of a few tens of
MB); a re-run with the same model reads them and only measures the candidates and chooses again (the grid
alone, not the searches). ``calibration.json`` holds each side's rule (``match``, read by
:class:`models.reference.MatchRule`; an older ``{"quantile", "margin"}`` rule still means what it meant), the
chosen test's figures and the best test of each family. A model folder without a bank (or calibrated
before banks, with a fixed ``min_score``) still works: :meth:`indexer.search.Searcher.mark_matches` falls back to that ``min_score``.
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

from alignsearch.models.reference import COLLECTION_M  # the collection evidence's rank, M

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

@dataclass
class Ranked:
    """A collection searched by a set of queries: per query its top items (by the fused two-stage score) and
    their global scores, its scores against the reference bank (queries x R, sorted) and its ``COLLECTION_M``-th
    best global score in the collection (NaN: unknown)."""

    items: np.ndarray  # queries x k
    global_scores: np.ndarray  # queries x k
    reference: np.ndarray  # queries x R
    collection: np.ndarray | None = None  # queries


def thresholds(ranked: Ranked, rule) -> np.ndarray:
    """Per-query threshold of a :class:`models.reference.MatchRule` (the product's own computation)."""
    return rule.threshold(ranked.reference, ranked.collection)


def right_first_flagged(ranked: Ranked, right: Sequence[set[int]], rule) -> dict[str, Any]:
    """Of the queries whose first hit is right, the percent whose first hit is flagged; also the percent of
    wrong first hits flagged."""
    thr = thresholds(ranked, rule)
    first_right = np.array([int(ranked.items[q, 0]) in right[q] for q in range(len(right))])
    flagged = ranked.global_scores[:, 0] >= thr
    return {"right_first": int(first_right.sum()),
            "right_first_flagged": _pct(flagged[first_right]),
            "wrong_first_flagged": _pct(flagged[~first_right])}


def no_match_rate(ranked: Ranked, rule) -> float:
    """Percent of queries none of whose top hits is flagged."""
    thr = thresholds(ranked, rule)
    return _pct(~(ranked.global_scores >= thr[:, None]).any(1))


def _pct(mask: np.ndarray) -> float:
    return round(100.0 * float(np.mean(mask)), 2) if len(mask) else 0.0


FAMILIES = ("RQ", "RZ", "CG", "RZ|CG", "RQ|CG", "LIN")  # the tie order: fewer parameters first


def choose_rule(grid: list[dict[str, Any]], floor: float = NONSENSE_FLOOR, tie: float = 0.5
                ) -> tuple[dict[str, Any], bool]:
    """The selection rule of the module docstring over rows ``{"family", "rule", "no_match", "flagged",
    "strictness"}`` (``no_match``: the lowest no-match rate over the negative sets; ``flagged``: the rate to
    maximise; ``strictness``: larger is stricter). Returns (the row, whether it met the floor)."""
    if not grid:
        raise ValueError("no candidate rules")
    ok = [r for r in grid if r["no_match"] >= floor]
    if not ok:
        rq = [r for r in grid if r["family"] == "RQ"] or grid
        return max(rq, key=lambda r: r["strictness"]), False
    best = max(r["flagged"] for r in ok)
    near = [r for r in ok if r["flagged"] >= best - tie]
    return min(near, key=lambda r: (-r["no_match"], FAMILIES.index(r["family"]), -r["strictness"])), True


# -- the calibration sets, summarised for a fast grid ---------------------------------------------------------

@dataclass
class Summary:
    """One collection searched by one query set, reduced to what a threshold on g needs: the first hit's
    global score, the best global score of the top ``TOP_K``, whether the first hit is right (None: a negative
    set), the queries' rows in their query set's reference statistics, and the ``COLLECTION_M``-th best score."""

    first: np.ndarray
    best: np.ndarray
    right: np.ndarray | None
    query: np.ndarray
    collection: np.ndarray

    @staticmethod
    def join(parts: Sequence["Summary"]) -> "Summary":
        cat = np.concatenate
        return Summary(cat([p.first for p in parts]), cat([p.best for p in parts]),
                       None if parts[0].right is None else cat([p.right for p in parts]),
                       cat([p.query for p in parts]), cat([p.collection for p in parts]))


@dataclass
class RefStats:
    """Per query of a query set: its reference scores' quantiles (``QUANTILES`` x queries), mean and sd."""

    quantiles: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    sorted: np.ndarray  # queries x R, for the product's own threshold

    @staticmethod
    def of(reference: np.ndarray) -> "RefStats":
        ref = np.asarray(reference, dtype=np.float64)
        return RefStats(np.quantile(ref, QUANTILES, axis=1), ref.mean(1), np.maximum(ref.std(1), 1e-6), reference)


def _fast_threshold(family: str, params: tuple, st: RefStats, s: Summary) -> np.ndarray:
    """The threshold of a grid point, per query of ``s`` (what :meth:`MatchRule.threshold` computes)."""
    q = s.query
    parts = []
    if family in ("RQ", "RQ|CG"):
        parts.append(st.quantiles[QUANTILES.index(params[0]), q] + params[1])
    if family in ("RZ", "RZ|CG"):
        parts.append(st.mean[q] + params[0] * st.sd[q])
    if family in ("CG", "RZ|CG", "RQ|CG"):
        parts.append(s.collection + params[-1])
    if family == "LIN":
        a, b, c = params
        mean, sd = st.mean[q], st.sd[q]
        parts.append((c + a * mean / sd + b * s.collection) / (a / sd + b))
    return np.min(np.stack(parts), axis=0)


def _rule(family: str, params: tuple):
    from alignsearch.models.reference import COLLECTION_M as M
    from alignsearch.models.reference import MatchRule

    if family == "RQ":
        return MatchRule(quantile=params[0], margin=params[1])
    if family == "RZ":
        return MatchRule(z=params[0])
    if family == "CG":
        return MatchRule(gap=params[0], collection_m=M)
    if family == "RZ|CG":
        return MatchRule(z=params[0], gap=params[1], collection_m=M)
    if family == "RQ|CG":
        return MatchRule(quantile=params[0], margin=params[1], gap=params[2], collection_m=M)
    return MatchRule(linear=tuple(float(x) for x in params), collection_m=M)


def _grid_points(family: str, linear_dir: tuple[float, float] | None, cuts: np.ndarray | None):
    if family == "RQ":
        return [(q, m) for q in QUANTILES for m in MARGINS]
    if family == "RZ":
        return [(t,) for t in Z_CUTS]
    if family == "CG":
        return [(d,) for d in GAPS]
    if family == "RZ|CG":
        return [(t, d) for t in Z_CUTS for d in GAPS]
    if family == "RQ|CG":
        return [(q, m, d) for q in QUANTILES for m in MARGINS for d in GAPS]
    if linear_dir is None or cuts is None:
        return []
    return [(linear_dir[0], linear_dir[1], round(float(c), 5)) for c in cuts]


def _strictness(family: str, params: tuple) -> float:
    return float(sum(params)) if family != "LIN" else float(params[2])


def fit_linear(positives: Sequence[tuple[Summary, RefStats, float]], negatives: Sequence[tuple[Summary, RefStats, float]]
               ) -> tuple[tuple[float, float], np.ndarray]:
    """LIN's direction (a, b) from a weighted logistic regression on first hits (features z and gap; each
    set's weight is shared among its queries), scaled so that a + b = 1 and clipped at 0; and its grid of
    cuts (301 values across the positives' and negatives' decision values)."""
    from sklearn.linear_model import LogisticRegression

    xs, ys, ws = [], [], []
    for sets, label in ((positives, 1), (negatives, 0)):
        for s, st, weight in sets:
            keep = s.right if s.right is not None else np.ones(len(s.first), dtype=bool)
            g, q = s.first[keep], s.query[keep]
            xs.append(np.stack([(g - st.mean[q]) / st.sd[q], g - s.collection[keep]], 1))
            ys.append(np.full(len(g), label))
            ws.append(np.full(len(g), weight / max(len(g), 1)))
    x, y, w = np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)
    scale = x.std(0)
    model = LogisticRegression(C=1.0).fit(x / scale, y, sample_weight=w / w.mean())
    a, b = np.maximum(model.coef_[0] / scale, 0.0)
    if a + b <= 0:
        a, b = 1.0, 0.0
    a, b = a / (a + b), b / (a + b)
    values = a * x[:, 0] + b * x[:, 1]
    return (round(float(a), 6), round(float(b), 6)), np.linspace(np.quantile(values, 0.01), values.max(), 301)


def measure_grid(positives: dict[str, tuple[Summary, RefStats]], negatives: dict[str, tuple[Summary, RefStats]],
                 flagged_of, linear: tuple[tuple[float, float], np.ndarray] | None) -> list[dict[str, Any]]:
    """Every grid point of every family: its lowest no-match rate over ``negatives``, each set's figures, and
    ``flagged_of(per-set right-first-flagged rates)``."""
    rows = []
    for family in FAMILIES:
        points = _grid_points(family, *(linear if linear else (None, None)))
        for params in points:
            figures, no_match = {}, {}
            for name, (s, st) in positives.items():
                flag = s.first >= _fast_threshold(family, params, st, s)
                figures[name] = {"right_first": int(s.right.sum()), "right_first_flagged": _pct(flag[s.right]),
                                 "wrong_first_flagged": _pct(flag[~s.right])}
            for name, (s, st) in negatives.items():
                no_match[name] = _pct(s.best < _fast_threshold(family, params, st, s))
            rows.append({"family": family, "params": params, "no_match": min(no_match.values()),
                         "flagged": round(flagged_of({k: v["right_first_flagged"] for k, v in figures.items()}), 2),
                         "strictness": _strictness(family, params), "positives": figures,
                         "nonsense_no_match": no_match})
    return rows


# -- two-stage search in memory -----------------------------------------------------------------------------

def two_stage(queries, items, query_is_text: bool, scoring, k: int = TOP_K, candidates: int = CANDIDATES,
              chunk: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What :class:`indexer.search.Searcher` returns, computed on encoder outputs held in memory: the top
    ``candidates`` items by global score, reranked by ``scoring``'s fused score (ties by item row). Returns
    (items, global scores), queries x k, and each query's ``COLLECTION_M``-th best global score."""
    from alignsearch.models import alignment
    from alignsearch.models.reference import collection_score

    g = queries.global_emb.float() @ items.global_emb.float().T
    collection = np.array([collection_score(row, COLLECTION_M)
                           for row in g.topk(min(COLLECTION_M, g.shape[1]), dim=1).values.numpy()])
    candidates = min(candidates, g.shape[1])
    k = min(k, candidates)
    top_g, top = g.topk(candidates, dim=1)
    out_items, out_g = [], []
    for s in range(0, len(top), chunk):
        rows = top[s : s + chunk]
        q = slice(s, s + len(rows))
        if query_is_text:  # words of the query against the regions of each candidate
            t = max(int(queries.mask[q].sum(1).max()), 1)  # the chunk's longest query: less padding to score
            sims = torch.einsum("btd,bkrd->bktr", queries.local[q, :t].float(), items.local[rows].float())
            word_mask, region_mask = queries.mask[q, :t][:, None, :], items.mask[rows]
        else:  # words of each candidate caption against the regions of the query
            t = max(int(items.mask[rows].sum(-1).max()), 1)
            sims = torch.einsum("bktd,brd->bktr", items.local[rows][:, :, :t].float(), queries.local[q].float())
            word_mask, region_mask = items.mask[rows][:, :, :t], queries.mask[q][:, None, :]
        local = alignment.pair_scores(sims, word_mask, region_mask, scoring.alignment, scoring.lse_lambda)
        fused = scoring.fuse(top_g[q], local).numpy()
        for b in range(len(rows)):
            order = np.lexsort((rows[b].numpy(), -fused[b]))[:k]
            out_items.append(rows[b].numpy()[order])
            out_g.append(top_g[q][b].numpy()[order])
    return np.stack(out_items), np.stack(out_g), collection


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

    if getattr(model, "companion", None) is not None:  # two image towers: no cached backbone features to reuse
        from alignsearch.models.model import EncoderOutput
        from alignsearch.models.preprocess import load_image

        return EncoderOutput.concat([model.encode_images([load_image(p) for p in paths[i:i + 64]])
                                     for i in range(0, len(paths), 64)])
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
              cache_dir: Path | None = CACHE_DIR, sets_file: Path | None = None
              ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Encode the bank and the calibration sets, measure every candidate test and choose by the rule of the
    module docstring. Returns (the calibration report, the bank's photo vectors, its caption vectors).
    ``sets_file``: where the searched sets are kept (pickle) for a re-run with the same model; read when it
    exists and was made by this model, written otherwise."""
    import pickle

    if sets_file is not None and sets_file.is_file():
        with open(sets_file, "rb") as f:
            sets = pickle.load(f)  # noqa: S301 - a file this function wrote
        if sets.get("model_fingerprint") == model.fingerprint:
            return choose(model, sets)
    sets = measure_sets(model, flickr8k, flickr8k_800, cache_dir)
    if sets_file is not None:
        sets_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = sets_file.with_name(sets_file.name + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(sets, f)
        os.replace(tmp, sets_file)
    return choose(model, sets)


def measure_sets(model, flickr8k: Path, flickr8k_800: Path, cache_dir: Path | None) -> dict[str, Any]:
    """Encode the bank and the calibration sets and search them: every set's :class:`Summary` and its
    queries' :class:`RefStats`, the bank's vectors, and the sets' sizes."""
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

    def stats(enc, query_is_text: bool) -> RefStats:
        return RefStats.of(bank.scores(enc.global_emb.float().numpy(), query_is_text))

    text_ref, nonsense_ref, plain_ref = stats(val_texts, True), stats(nonsense_enc, True), stats(plain_enc, True)
    image_ref, fake_ref = stats(val_images, False), stats(fake, False)
    pkg_photo_ref = stats(package.select(range(len(photos))), False)

    def summarise(q, items, query_is_text: bool, right: Sequence[set[int]] | None, rows) -> Summary:
        found, g, coll = two_stage(q, items, query_is_text, scoring)
        first_right = None if right is None else np.array([int(found[i, 0]) in right[i] for i in range(len(found))])
        return Summary(g[:, 0], g.max(1), first_right, np.asarray(rows, dtype=np.int64), coll)

    caption_image = np.array([i for i, r in enumerate(val) for _ in r.captions])
    rng = np.random.default_rng(SEED)
    collections = {"val": np.arange(len(val))}  # photo rows of val in each collection; subsets pooled by size
    draws = {f"val{size}": [np.sort(rng.choice(len(val), size, replace=False)) for _ in range(count)]
             for size, count in SUBSETS.items()}
    fake_rows = np.arange(NONSENSE_IMAGES)
    text_pos, text_neg, image_pos, image_neg = {}, {}, {}, {}
    for name, subsets in [("val", [collections["val"]]), *draws.items()]:
        t_pos, t_neg, i_pos, i_neg = [], [], [], []
        for idx in subsets:
            caps = np.flatnonzero(np.isin(caption_image, idx))
            where = {int(photo): j for j, photo in enumerate(idx)}
            sub_images, sub_texts = val_images.select(idx.tolist()), val_texts.select(caps.tolist())
            t_pos.append(summarise(val_texts.select(caps.tolist()), sub_images, True,
                                   [{where[int(caption_image[c])]} for c in caps], caps))
            t_neg.append(summarise(nonsense_enc, sub_images, True, None, np.arange(len(nonsense))))
            i_pos.append(summarise(sub_images, sub_texts, False,
                                   [set(np.flatnonzero(caption_image[caps] == photo).tolist()) for photo in idx], idx))
            i_neg.append(summarise(fake, sub_texts, False, None, fake_rows))
        text_pos[name], text_neg[name] = (Summary.join(t_pos), text_ref), (Summary.join(t_neg), nonsense_ref)
        image_pos[name], image_neg[name] = (Summary.join(i_pos), image_ref), (Summary.join(i_neg), fake_ref)
    names = list(photos)
    text_pos["package"] = (summarise(plain_enc, package, True,
                                     [{names.index(p) for p in expected} for expected in queries.values()],
                                     np.arange(len(queries))), plain_ref)
    text_neg["package"] = (summarise(nonsense_enc, package, True, None, np.arange(len(nonsense))), nonsense_ref)
    pkg_photos_val = (summarise(package.select(range(len(photos))), val_texts, False, None, np.arange(len(photos))),
                      pkg_photo_ref)

    return {"model_fingerprint": model.fingerprint, "text_pos": text_pos, "text_neg": text_neg,
            "image_pos": image_pos, "image_neg": image_neg, "package_photos_val": pkg_photos_val,
            "bank_images": bank.images, "bank_captions": bank.captions,
            "sizes": {"val": len(val), "val_captions": len(val_captions), "package_photos": len(package_paths),
                      "package_queries": len(queries), "reference": n_ref}}


def choose(model, sets: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Measure every candidate test on the searched sets and choose by the rule of the module docstring."""
    text_pos, text_neg, image_pos, image_neg = (sets[k] for k in ("text_pos", "text_neg", "image_pos", "image_neg"))
    pkg_photos_val, sizes = sets["package_photos_val"], sets["sizes"]
    n_ref = sizes["reference"]
    val_names = [n for n in image_pos]

    def text_flagged(f: dict[str, float]) -> float:
        return (f["package"] + sum(f[n] for n in val_names) / len(val_names)) / 2

    def image_flagged(f: dict[str, float]) -> float:
        return sum(f[n] for n in val_names) / len(val_names)

    def weighted(group: dict[str, tuple[Summary, RefStats]], total: float):
        return [(s, st, total / len(group)) for s, st in group.values()]

    text_linear = fit_linear(weighted({n: text_pos[n] for n in val_names}, 1.0) + [(*text_pos["package"], 1.0)],
                             weighted(text_neg, 2.0))
    image_linear = fit_linear(weighted(image_pos, 1.0), weighted(image_neg, 1.0))
    text_grid = measure_grid(text_pos, text_neg, text_flagged, text_linear)
    image_grid = measure_grid(image_pos, image_neg, image_flagged, image_linear)
    text_row, text_ok = choose_rule(text_grid)
    image_row, image_ok = choose_rule(image_grid)
    text_rule, image_rule = _rule(text_row["family"], text_row["params"]), _rule(image_row["family"], image_row["params"])
    for row, pos, neg in ((text_row, text_pos, text_neg), (image_row, image_pos, image_neg)):
        _check_product(row["family"], row["params"], {**{f"{k} right": v for k, v in pos.items()},
                                                      **{f"{k} nonsense": v for k, v in neg.items()}})

    def trimmed(row: dict[str, Any]) -> dict[str, Any]:
        return {"family": row["family"], "flagged": row["flagged"], "right_first": row["positives"],
                "nonsense_no_match": row["nonsense_no_match"]}

    def best_of_each(grid: list[dict[str, Any]]) -> dict[str, Any]:
        out = {}
        for family in FAMILIES:
            rows = [r for r in grid if r["family"] == family]
            if rows:
                row, ok = choose_rule(rows)
                out[family] = {"rule": _rule(family, row["params"]).to_dict(), "floor_met": ok, **trimmed(row)}
        return out

    image_report = trimmed(image_row)
    pkg_s, pkg_st = pkg_photos_val
    image_report["package_photos_no_match"] = _pct(pkg_s.best < image_rule.threshold(pkg_st.sorted[pkg_s.query],
                                                                                     pkg_s.collection))
    subsets = ", ".join(f"{count} subsets of {size} photos" for size, count in SUBSETS.items())
    report = {
        "match": {"text": text_rule.to_dict(), "image": image_rule.to_dict()},
        "on": "global_score",
        "reference": {"photos": n_ref, "captions": n_ref, "from": "Flickr8k train (not in Flickr8k-800), "
                      f"seed {SEED}, one caption per photo"},
        "chosen_on": f"Flickr8k val ({sizes['val']} photos, {sizes['val_captions']} captions; whole and {subsets}), "
                     f"the package-photo set ({sizes['package_photos']} photos, {sizes['package_queries']} queries), "
                     f"{N_NONSENSE} "
                     f"nonsense strings and {NONSENSE_IMAGES} generated non-photos (seed {SEED}) in each; top "
                     f"{TOP_K} of two-stage (K={CANDIDATES}); the rule of bench/min_score.py's docstring "
                     f"(no-match floor {NONSENSE_FLOOR}%)",
        "floor_met": {"text": text_ok, "image": image_ok},
        "text_queries": trimmed(text_row),
        "image_queries": image_report,
        "candidates": {"text": best_of_each(text_grid), "image": best_of_each(image_grid)},
        "linear_fit": {"text": list(text_linear[0]), "image": list(image_linear[0])},
        "model_fingerprint": model.fingerprint,
    }
    return report, sets["bank_images"], sets["bank_captions"]


def _check_product(family: str, params: tuple, sets: dict[str, tuple[Summary, RefStats]]) -> None:
    """The grid's fast thresholds agree with the product's :meth:`MatchRule.threshold` for a grid point."""
    rule = _rule(family, params)
    for name, (s, st) in sets.items():
        product = rule.threshold(st.sorted[s.query], s.collection)
        if not np.allclose(product, _fast_threshold(family, params, st, s), atol=1e-5):
            raise AssertionError(f"{name}: the grid's thresholds differ from the product's")


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
    p.add_argument("--sets", type=Path, default=None,
                   help="keep the searched calibration sets in this file (pickle) and reuse them on a re-run with the "
                        "same model (only the choice runs again)")
    from alignsearch.models.factory import load_model

    try:
        args = p.parse_args(argv)
        model = load_model(args.model, device=args.device)
        report, images, captions = calibrate(model, args.flickr8k, DEFAULT_DATASET, args.cache_dir, args.sets)
    except (OSError, ValueError, ImportError) as exc:  # no model, data set or package there
        print(f"bench.min_score: error: {exc}", file=sys.stderr)
        return 2
    if args.write:
        write(Path(model.source), report, images, captions)
    print(json.dumps({k: v for k, v in report.items() if k != "grid"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
