"""Quality on the demo's 16 photos: plain queries (R@1, R@5), the demo captions as queries, the pointing game.

``python -m alignsearch.bench.demo_quality [MODEL]`` indexes the demo photos (scikit-image's samples, see
:mod:`service.demo`) with ``MODEL`` (default: the shipped default model) and prints the figures as JSON.
The data, written from the photos before any model output was seen, are in ``bench/data``:
``demo_queries.json`` (plain query -> the photo(s) that answer it; photos of the same scene, which answer
each other's captions too) and ``demo_boxes.json`` (hand-labelled boxes of each photo's main objects, with
the words that name them).

The pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016) counts, for
every labelled object word of a query or caption and its right photo, whether the word's best grid cell in the
search's explain output has its centre inside one of the word's boxes. ``chance`` is what a uniformly random
cell would score on the same trials: big boxes (a texture filling the photo) are easy, and ``chance`` says
how easy.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .cli import model_report_main

DATA = Path(__file__).resolve().parent / "data"
QUERIES_FILE = DATA / "demo_queries.json"
BOXES_FILE = DATA / "demo_boxes.json"

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Trial:
    """One grounded word on one photo: the cell the explain output chose for it."""

    image: str
    word: str
    cell: tuple[int, int]
    grid: tuple[int, int]
    confidence: float | None = None


def load_queries(path: Path = QUERIES_FILE) -> dict[str, list[str]]:
    """Plain query -> the demo photo names that answer it."""
    return json.loads(path.read_text(encoding="utf-8"))["queries"]


def load_same_scene(path: Path = QUERIES_FILE) -> dict[str, set[str]]:
    """Photo name -> the photos of the same scene (itself included): either answers a caption of one."""
    out: dict[str, set[str]] = {}
    for group in json.loads(path.read_text(encoding="utf-8")).get("same_scene", []):
        for image in group:
            out[image] = set(group)
    return out


def load_boxes(path: Path = BOXES_FILE) -> dict[str, dict[str, list[Box]]]:
    """Photo name -> word -> its boxes (relative x0, y0, x1, y1)."""
    out: dict[str, dict[str, list[Box]]] = {}
    for image, objects in json.loads(path.read_text(encoding="utf-8"))["images"].items():
        words = out.setdefault(image, {})
        for obj in objects:
            for word in obj["words"]:
                words.setdefault(word.lower(), []).append(tuple(obj["box"]))
    return out


def demo_captions() -> list[tuple[str, str]]:
    """(caption, photo name) for every demo caption that belongs to a photo."""
    from alignsearch.service.demo import DEMO_CAPTIONS

    rows = [json.loads(line) for line in DEMO_CAPTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["caption"], r["image"]) for r in rows if r.get("image")]


def recall_at(ranked: Sequence[Sequence[str]], expected: Sequence[Iterable[str]],
              ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Percent of queries with an expected item in their top k, for each k: ``{"r1": .., "r5": ..}``."""
    if len(ranked) != len(expected):
        raise ValueError("one ranking per query")
    if not ranked:
        return {f"r{k}": 0.0 for k in ks}
    sets = [set(e) for e in expected]
    return {f"r{k}": round(100.0 * sum(bool(set(r[:k]) & e) for r, e in zip(ranked, sets)) / len(ranked), 2)
            for k in ks}


def _centre_in(cell: tuple[int, int], grid: tuple[int, int], boxes: Sequence[Box]) -> bool:
    y, x = (cell[0] + 0.5) / grid[0], (cell[1] + 0.5) / grid[1]
    return any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in boxes)


def pointing_game(trials: Iterable[Trial], boxes: dict[str, dict[str, list[Box]]]) -> dict[str, Any]:
    """Pointing game over the trials whose word is labelled on their photo (others are ignored).

    Returns ``pointing_game`` (percent of hits), ``chance`` (percent a uniformly random cell would hit,
    averaged over the same trials), ``trials``, ``hits``, the mean confidence of hits and of misses, and per
    word ``[hits, trials]``.
    """
    hits = total = 0
    chance = 0.0
    conf: dict[bool, list[float]] = {True: [], False: []}
    per_word: dict[str, list[int]] = {}
    for t in trials:
        word_boxes = boxes.get(t.image, {}).get(t.word.lower())
        if not word_boxes:
            continue
        rows, cols = t.grid
        hit = _centre_in(t.cell, t.grid, word_boxes)
        inside = sum(_centre_in((r, c), t.grid, word_boxes) for r in range(rows) for c in range(cols))
        chance += inside / (rows * cols)
        hits += hit
        total += 1
        if t.confidence is not None:
            conf[hit].append(t.confidence)
        tally = per_word.setdefault(t.word.lower(), [0, 0])
        tally[0] += hit
        tally[1] += 1

    def mean(xs: list[float]) -> float | None:
        return round(sum(xs) / len(xs), 4) if xs else None

    return {
        "pointing_game": round(100.0 * hits / total, 2) if total else 0.0,
        "chance": round(100.0 * chance / total, 2) if total else 0.0,
        "trials": total,
        "hits": hits,
        "mean_confidence_hit": mean(conf[True]),
        "mean_confidence_miss": mean(conf[False]),
        "per_word": dict(sorted(per_word.items())),
    }


def build_demo_index(model, work: Path) -> Path:
    """Index the demo photos and captions with ``model`` under ``work``; returns the index folder."""
    from alignsearch.indexer.build import BuildOptions, build
    from alignsearch.service.demo import DEMO_CAPTIONS, sample_photos

    photos = sample_photos(work / "photos")
    out = work / "index"
    build(model, BuildOptions(images=photos, out=out, captions=DEMO_CAPTIONS, progress=False))
    return out


def _right_first_flagged(results, expected) -> dict[str, Any]:
    """Of the results whose first hit is right, how many; and the percent of them whose first hit is a match."""
    right = [r for r, exp in zip(results, expected) if r.hits and r.hits[0].id in exp]
    return {"right_first": len(right),
            "flagged": round(100.0 * sum(bool(r.hits[0].match) for r in right) / len(right), 2) if right else None}


def match_figures(searcher, results, expected, n_plain: int, n_nonsense: int = 100) -> dict[str, Any]:
    """The model's match signal on the demo (a check, never a choice): right first hits flagged as matches
    (plain queries, demo captions as queries, and each photo as an image query whose first caption is its own),
    nonsense strings (another seed than calibration's) with no match among all the photos, and the plain
    queries with a match."""
    from alignsearch.models.preprocess import load_image

    from .min_score import nonsense_queries

    n = searcher.index.images.live
    results = [searcher.mark_matches(r) for r in results]
    if results and results[0].match_test is None:
        return {"match_test": None}
    nonsense = [searcher.mark_matches(r) for r in
                searcher.search_text(nonsense_queries(n_nonsense, seed=1), k=n, candidates=n)]
    same_scene = load_same_scene()
    images = [row["id"] for row in searcher.index.conn.execute("SELECT id FROM images ORDER BY row")]
    captions = searcher.index.conn.execute("SELECT id, image_id FROM captions").fetchall()
    own = {i: {c["id"] for c in captions if c["image_id"] in same_scene.get(i, {i})} for i in images}
    by_image = [searcher.mark_matches(r) for r in searcher.search_image(
        [load_image(searcher.index.images_root / i) for i in images], k=10, candidates=100)]
    return {
        "match_test": results[0].match_test,
        "plain_queries": _right_first_flagged(results[:n_plain], expected[:n_plain]),
        "captions": _right_first_flagged(results[n_plain:], expected[n_plain:]),
        "image_queries": _right_first_flagged(by_image, [own[i] for i in images]),
        "nonsense_with_no_match": round(100.0 * sum(r.no_match for r in nonsense) / len(nonsense), 2),
        "plain_queries_with_a_match": round(100.0 * sum(not r.no_match for r in results[:n_plain]) / n_plain, 2),
    }


def evaluate(searcher) -> dict[str, Any]:
    """The demo figures for an open :class:`indexer.search.Searcher` over the demo index."""
    n = searcher.index.images.live
    queries = load_queries()
    captions = demo_captions()
    same_scene = load_same_scene()
    sentences = list(queries) + [c for c, _ in captions]
    expected = list(queries.values()) + [sorted(same_scene.get(image, {image})) for _, image in captions]
    results = searcher.search_text(sentences, k=n, candidates=n, explain=True)
    ranked = [[h.id for h in r.hits] for r in results]
    n_plain = len(queries)
    trials = [
        Trial(h.id, g["word"], tuple(g["cell"]), tuple(g["grid"]), g.get("confidence"))
        for r, exp in zip(results, expected) for h in r.hits if h.id in exp
        for g in h.grounding or [] if g.get("cell") is not None
    ]
    matches = match_figures(searcher, results, expected, n_plain)
    plain = recall_at(ranked[:n_plain], expected[:n_plain])
    caps = recall_at(ranked[n_plain:], expected[n_plain:])
    strict = recall_at(ranked[n_plain:], [[image] for _, image in captions], ks=(1,))
    return {
        "images": n,
        "plain_queries": {"queries": n_plain, **plain},
        "captions": {"queries": len(captions), "right_first": caps["r1"], "r5": caps["r5"],
                     "right_first_strict": strict["r1"]},
        "pointing": pointing_game(trials, load_boxes()),
        "match": matches,
        "misses_at_1": {s: r[0] for s, r, e in zip(sentences, ranked, expected) if r and r[0] not in e},
    }


def run(model_name: str | None = None, device: str = "auto", work: Path | None = None) -> dict[str, Any]:
    """Index the demo photos with the model (default: the shipped one) and evaluate them."""
    from alignsearch.indexer.search import Searcher
    from alignsearch.models.factory import load_model

    model = load_model(model_name, device=device)
    with tempfile.TemporaryDirectory(prefix="demo-quality-") as tmp:
        index_dir = build_demo_index(model, Path(work or tmp))
        report = evaluate(Searcher.open(index_dir, model))
    report["model_fingerprint"] = model.fingerprint
    return report


def main(argv: list[str] | None = None) -> int:
    return model_report_main(argv, "demo_quality", "prints the demo figures as JSON", run)


if __name__ == "__main__":
    sys.exit(main())
