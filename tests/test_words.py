"""Whole words from word pieces, content words, and whole-word groundings (models.words, models.alignment)."""

from __future__ import annotations

import torch

from alignsearch.models import alignment
from alignsearch.models.words import STOPWORDS, content_words, merge_pieces


def _texts(words):
    return [(w.text, w.pieces) for w in words]


def test_wordpiece_continuations_join_the_previous_word():
    pieces = ["a", "man", "on", "a", "skate", "##board", "."]
    assert _texts(merge_pieces(pieces)) == [("a", (0,)), ("man", (1,)), ("on", (2,)), ("a", (3,)),
                                            ("skateboard", (4, 5)), (".", (6,))]
    assert [w.text for w in content_words(pieces)] == ["man", "skateboard"]


def test_sentencepiece_and_clip_bpe_markers():
    assert _texts(merge_pieces(["\u2581Skate", "board", "\u2581is", "\u2581fun"])) == [
        ("skateboard", (0, 1)), ("is", (2,)), ("fun", (3,))]
    assert _texts(merge_pieces(["skate", "board</w>", "is</w>", "fun</w>"])) == [
        ("skateboard", (0, 1)), ("is", (2,)), ("fun", (3,))]


def test_punctuation_and_stopwords_are_not_content_words():
    pieces = ["two", "dogs", ",", "playing", "in", "the", "snow", "!", "kitten", "'", "s", "close", "-", "up"]
    assert [w.text for w in content_words(pieces)] == ["two", "dogs", "playing", "snow", "kitten", "close"]
    assert content_words(["the", "a", "."]) == []
    assert {"the", "a", "of", "is"} <= STOPWORDS and not {"red", "dog", "two", "jumps"} & STOPWORDS


def test_a_continuation_never_glues_onto_punctuation():
    assert [w.text for w in merge_pieces([".", "##s", "cat"])] == [".", "s", "cat"]


def test_whole_word_groundings_mean_over_pieces_and_softmax_confidence():
    regions = torch.eye(4)[:3]  # 3 regions: e0, e1, e2 (4-d)
    pieces = torch.tensor([[1.0, 0, 0, 0],   # word 0 = one piece, on region 0
                           [0, 0.9, 0.5, 0],  # word 1 = pieces 1 and 2: mean (0, 0.45, 0.65) -> region 2
                           [0, 0, 0.8, 0],
                           [0, 0, 0, 1.0]])   # word 2: like no region at all
    index, sims, conf = alignment.whole_word_groundings(pieces, regions, torch.ones(3), [(0,), (1, 2), (3,)])
    assert index.tolist()[:2] == [0, 2]
    torch.testing.assert_close(sims, torch.tensor([1.0, 0.65, 0.0]))
    # softmax at T = 0.05: a clear winner is near 1, a tie over 3 regions is 1/3
    assert conf[0] > 0.99 and 0.97 < conf[1] < 0.99
    torch.testing.assert_close(conf[2], torch.tensor(1 / 3))
    # a masked region never wins and takes no probability
    index, _, conf = alignment.whole_word_groundings(pieces, regions, torch.tensor([0, 1, 1]), [(0,), (3,)])
    assert index[0] != 0 and abs(conf[1].item() - 0.5) < 1e-6
    assert alignment.whole_word_groundings(pieces, regions, torch.ones(3), [])[0].numel() == 0
