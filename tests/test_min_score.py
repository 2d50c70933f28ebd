"""Choosing a model's min_score (bench.min_score) and loading it with the model (models.factory)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from alignsearch.bench import min_score as ms
from alignsearch.models.factory import PRETRAINED_DIR, load_calibration, model_fingerprint


def test_nonsense_queries_are_fixed_for_a_seed_and_varied():
    a, b = ms.nonsense_queries(40, seed=3), ms.nonsense_queries(40, seed=3)
    assert a == b and a != ms.nonsense_queries(40, seed=4)
    assert len(set(a)) == 40 and all(q.strip() for q in a)
    assert any(q.replace(" ", "").isdigit() for q in a) and any(q.replace(" ", "").isalpha() for q in a)


def test_min_score_is_the_nonsense_quantile_rounded_up():
    nonsense_best = np.linspace(0.0, 0.2, 101)  # quantile 0.99 = 0.198
    assert ms.choose_min_score(nonsense_best) == 0.2
    assert ms.choose_min_score([0.1234], quantile=1.0) == 0.13
    assert ms.choose_min_score([0.12], quantile=1.0) == 0.12  # already on the grid: not pushed up
    with pytest.raises(ValueError):
        ms.choose_min_score([])


def test_kept_counts_best_hits_and_right_images_in_the_top_k():
    scores = np.array([[0.5, 0.1, 0.0],    # right = 0: best 0.5 kept, right rank 0 kept
                       [0.3, 0.15, 0.0],   # right = 1: best kept, right rank 1 (0.15) below 0.2
                       [0.1, 0.05, 0.0]])  # right = 2: best 0.1 below; right rank 2, below
    out = ms.kept(scores, np.array([0, 1, 2]), 0.2, k=2)
    assert out == {"best_hit_kept": 66.67, "right_in_top2_kept": 50.0}


def test_calibration_file_is_read_with_the_model_and_left_out_of_its_fingerprint(tmp_path):
    shipped = PRETRAINED_DIR / "default"
    assert 0 < load_calibration(shipped)["min_score"] < 1
    folder = tmp_path / "m"
    shutil.copytree(shipped, folder)
    (folder / "calibration.json").write_text(json.dumps({"min_score": 0.5}))
    assert load_calibration(folder) == {"min_score": 0.5}
    assert model_fingerprint(folder) == model_fingerprint(shipped)
    (folder / "calibration.json").write_text("{not json")
    assert load_calibration(folder) == {}
    (folder / "calibration.json").unlink()
    assert load_calibration(folder) == {}
