"""``bench.similar_quality``: the relevance written before measuring, and R@K against its random baseline."""

from __future__ import annotations

import numpy as np

from alignsearch.bench import similar_quality as sq


def test_subject_words_are_the_content_words_two_captions_share():
    words = sq.subject_words(["A dog runs on the grass .", "Two dogs run through grass", "A man sits"])
    assert words == {"dog", "grass", "run"}  # a final "s" dropped ("runs" = "run"); "man" is in one caption only


def test_recall_counts_a_relevant_photo_within_k_and_a_random_baseline():
    rel = sq.relevance([{"dog", "grass"}, {"dog", "grass", "ball"}, {"man", "bike"}, {"man", "bike", "road"}])
    assert rel[0, 1] and rel[2, 3] and not rel[0, 2] and not rel.diagonal().any()
    right = np.array([[1, .9, .1, .1], [.9, 1, .1, .1], [.1, .1, 1, .8], [.1, .1, .8, 1]])
    wrong = np.array([[1, .1, .9, .1], [.1, 1, .9, .1], [.9, .1, 1, .1], [.1, .9, .1, 1]])
    assert sq.recall(right, rel, ks=(1,))["r1"] == 100.0
    assert sq.recall(wrong, rel, ks=(1,))["r1"] == 0.0
    assert sq.recall(wrong, rel, ks=(1, 3))["random_r1"] == round(100 / 3, 2)  # 1 relevant among 3 others
    assert sq.recall(wrong, rel, ks=(3,))["r3"] == 100.0
