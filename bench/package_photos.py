"""A second out-of-domain check besides the demo: photos that ship with scikit-image and scikit-learn but are
not among the demo's 16, searched among the Flickr8k-800 validation photos.

``python -m alignsearch.bench.package_photos [MODEL]`` copies the 10 photos named in
``bench/data/package_photo_queries.json``, adds the 100 validation photos (carved out of Flickr8k-800's train
split, never ``test``) as distractors, indexes them with ``MODEL`` (default: the shipped model) and prints, as
JSON, R@1 / R@5 of the 20 plain queries (two per photo, written from the photos before any model output was
seen), how many of those whose photo ranks first have it flagged as a match by the model's match signal
(:meth:`indexer.search.Searcher.mark_matches`), and each miss's first hit.

Unlike the demo, which stays a test, this set may be used to choose between inference-time settings, together
with the Flickr validation split. A query is right when its photo ranks first among the 110 photos: an
out-of-domain photo has to beat 100 in-domain ones that the heads know well.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .cli import DEFAULT_DATASET, model_report_main
from .demo_quality import DATA, recall_at

QUERIES_FILE = DATA / "package_photo_queries.json"
CANDIDATES = 20  # the first stage's K, as `alignsearch eval` measures two-stage


def load_spec(path: Path = QUERIES_FILE) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(photo name -> the package that ships it, plain query -> the photo names that answer it)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["photos"], data["queries"]


def package_folders() -> dict[str, Path]:
    """Where each package keeps its sample photos (``ImportError`` when one is not installed)."""
    import skimage
    import sklearn

    return {"skimage": Path(skimage.__file__).parent / "data",
            "sklearn": Path(sklearn.__file__).parent / "datasets" / "images"}


def stage_photos(target: Path, dataset: Path = DEFAULT_DATASET) -> int:
    """Copy the package photos and the Flickr8k-800 validation photos into ``target``; returns the photo count."""
    from alignsearch.models.data import load_dataset, select_split

    annotations = dataset / "dataset_flickr8k.json"
    if not annotations.is_file():
        raise FileNotFoundError("the Flickr8k-800 validation photos (the distractors) were not found; "
                                "set ALIGNSEARCH_DATASET to the dataset folder")
    photos, _ = load_spec()
    folders = package_folders()
    target.mkdir(parents=True, exist_ok=True)
    for name, package in photos.items():
        shutil.copyfile(folders[package] / name, target / name)
    distractors = select_split(load_dataset(annotations), "val")
    for record in distractors:
        shutil.copyfile(dataset / "images" / record.filename, target / record.filename)
    return len(photos) + len(distractors)


def evaluate(searcher, candidates: int = CANDIDATES) -> dict[str, Any]:
    """The figures for an open :class:`indexer.search.Searcher` over the staged photos."""
    _, queries = load_spec()
    n = searcher.index.images.live
    results = [searcher.mark_matches(r) for r in searcher.search_text(list(queries), k=n, candidates=candidates)]
    ranked = [[h.id for h in r.hits] for r in results]
    expected = list(queries.values())
    right = [r for r, exp in zip(results, expected) if r.hits and r.hits[0].id in exp]
    return {
        "images": n,
        "queries": len(queries),
        "candidates": candidates,
        **recall_at(ranked, expected),
        "match_test": results[0].match_test if results else None,
        "right_first_flagged": round(100.0 * sum(bool(r.hits[0].match) for r in right) / len(right), 2)
        if right and results[0].match_test else None,
        "misses_at_1": {q: r[0] for q, r, e in zip(queries, ranked, expected) if r and r[0] not in e},
    }


def run(model_name: str | None = None, dataset: Path = DEFAULT_DATASET, device: str = "auto") -> dict[str, Any]:
    """Stage the photos, index them with the model (default: the shipped one) and evaluate."""
    from alignsearch.indexer.build import BuildOptions, build
    from alignsearch.indexer.search import Searcher
    from alignsearch.models.factory import load_model

    model = load_model(model_name, device=device)
    with tempfile.TemporaryDirectory(prefix="package-photos-") as tmp:
        photos = Path(tmp) / "photos"
        stage_photos(photos, dataset)
        build(model, BuildOptions(images=photos, out=Path(tmp) / "index", progress=False))
        report = evaluate(Searcher.open(Path(tmp) / "index", model))
    report["model_fingerprint"] = model.fingerprint
    return report


def main(argv: list[str] | None = None) -> int:
    return model_report_main(argv, "package_photos", "prints the figures as JSON; the distractors come from "
                             "ALIGNSEARCH_DATASET", run)


if __name__ == "__main__":
    sys.exit(main())
