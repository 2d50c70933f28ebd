"""The shipped default model: loads offline, and still reaches its model card's figures on the test split."""

from __future__ import annotations

import json

import pytest

from alignsearch.models.factory import PRETRAINED_DIR, load_model

CARD = PRETRAINED_DIR / "default" / "metrics.json"
TOLERANCE = 2.0  # rsum points: float differences across machines, never a silent regression


@pytest.fixture(scope="module")
def default_model():
    if not CARD.is_file():
        pytest.fail("the default model (models/pretrained/default) is missing its metrics.json")
    return load_model(device="cpu")


def test_default_model_is_small_and_has_a_card():
    folder = PRETRAINED_DIR / "default"
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 20 * 1024 * 1024
    card = (folder / "README.md").read_text()
    assert "alignsearch train" in card and "two-stage" in card


@pytest.mark.slow
def test_default_model_meets_its_card_on_the_test_split(default_model, dataset_dir):
    from alignsearch.indexer.evaluate import evaluate_split

    card = json.loads(CARD.read_text())
    report = evaluate_split(default_model, dataset_dir / "dataset_flickr8k.json", dataset_dir / "images",
                              "test", card["candidates"], progress=False)
    results = report["results"]
    assert report["images"] == 100 and report["captions"] == 500
    for mode in ("global", "exhaustive", "two-stage"):
        assert results[mode]["rsum"] >= card["results"][mode]["rsum"] - TOLERANCE, (mode, results[mode])
    assert results["two-stage"]["rsum"] > results["global"]["rsum"]
    assert results["two-stage"]["rsum"] >= 330
