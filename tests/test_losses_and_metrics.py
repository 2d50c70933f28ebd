"""Losses and recall metrics on small hand-checked cases."""

import pytest
import torch

from alignsearch.models.evaluation import evaluate_scores, keep_top_k, recall_metrics
from alignsearch.models.losses import hardest_negative_triplet, info_nce


def test_triplet_is_zero_when_positives_beat_negatives_by_the_margin():
    scores = torch.tensor([[1.0, 0.5], [0.2, 1.0]])
    assert hardest_negative_triplet(scores, margin=0.2).item() == 0.0


def test_triplet_uses_hardest_negative_both_ways():
    scores = torch.tensor([[0.5, 0.6, 0.1], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]])
    # text 0: hardest wrong image 0.6 -> 0.2 + 0.6 - 0.5 = 0.3; image 1 (col): hardest wrong text 0.6 vs pos 0.5
    # -> 0.3; all other terms are 0.
    assert hardest_negative_triplet(scores, margin=0.2).item() == pytest.approx(0.6)


def test_info_nce_lower_for_better_alignment():
    good = torch.eye(4)
    bad = torch.ones(4, 4)
    assert info_nce(good).item() < info_nce(bad).item()


def test_recall_counts_like_the_papers():
    # 2 images, 4 captions: captions 0,1 -> image 0; 2,3 -> image 1
    text_to_image = torch.tensor([0, 0, 1, 1])
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.1, 0.7], [0.3, 0.6]])
    m = recall_metrics(scores, text_to_image)
    assert m["t2i_r1"] == 75.0  # caption 1 ranks its image second
    # image 0's best caption is caption 0 (0.9): hit at 1; image 1's best is caption 1 (0.8): miss at 1
    assert m["i2t_r1"] == 50.0
    assert m["i2t_r5"] == 100.0 and m["t2i_r5"] == 100.0
    assert m["rsum"] == pytest.approx(50 + 100 + 100 + 75 + 100 + 100)


def test_ground_truth_outside_candidates_is_a_miss():
    text_to_image = torch.tensor([0, 1])
    global_scores = torch.tensor([[0.1, 0.9, 0.8], [0.1, 0.9, 0.8]])
    fused = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    res = evaluate_scores(global_scores, fused, text_to_image, candidates=2)
    assert res["exhaustive"]["t2i_r1"] == 100.0
    assert res["two-stage"]["t2i_r1"] == 50.0  # text 0's image is not in its global top 2
    assert res["two-stage"]["t2i_r10"] == 50.0  # and never counted, however large K in R@K


def test_keep_top_k_masks_non_candidates():
    by = torch.tensor([[3.0, 1.0, 2.0]])
    out = keep_top_k(torch.tensor([[1.0, 1.0, 1.0]]), by, 2, dim=1)
    assert out.tolist() == [[1.0, float("-inf"), 1.0]]
