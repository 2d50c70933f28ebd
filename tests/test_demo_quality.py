"""Demo quality: plain queries and the demo captions on the 16 demo photos, and the pointing game."""

from __future__ import annotations

import pytest

from alignsearch.bench import demo_quality as dq
from alignsearch.service.demo import SAMPLE_PHOTOS

TARGET = ("the demo's target; the shipped model (plain queries R@1 60.0 / R@5 80.0, pointing game 54.5) does not "
          "reach it yet")
# What the shipped model reaches (models/pretrained/default/README.md), less a margin for float noise: a
# regression below these fails, whatever the targets above say.
SHIPPED = {"plain_r1": 56.0, "plain_r5": 76.0, "captions_right_first": 77.0}


def test_queries_and_boxes_cover_the_demo_photos():
    queries = dq.load_queries()
    assert len(queries) >= 20
    answered = {image for images in queries.values() for image in images}
    assert answered == set(SAMPLE_PHOTOS)  # every photo has a query, and every query a demo photo
    boxes = dq.load_boxes()
    assert set(boxes) == set(SAMPLE_PHOTOS)
    for words in boxes.values():
        for word, word_boxes in words.items():
            assert word == word.lower() and word.strip() == word
            assert all(0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 for x0, y0, x1, y1 in word_boxes)
    assert all(image in SAMPLE_PHOTOS for image in dq.load_same_scene())
    assert {image for _, image in dq.demo_captions()} <= set(SAMPLE_PHOTOS)


def test_recall_counts_any_expected_item_within_k():
    ranked = [["a", "b", "c"], ["c", "b", "a"], ["b", "c", "a"]]
    expected = [["a"], ["a", "b"], ["z"]]
    assert dq.recall_at(ranked, expected, ks=(1, 2, 3)) == {"r1": 33.33, "r2": 66.67, "r3": 66.67}
    with pytest.raises(ValueError):
        dq.recall_at(ranked, expected[:2])


def test_pointing_game_on_a_tiny_synthetic_case():
    # a 2 x 2 grid; "dog" fills the left column, "ball" is a small box around the top-right cell's centre
    boxes = {"p.png": {"dog": [(0.0, 0.0, 0.5, 1.0)], "ball": [(0.7, 0.2, 0.8, 0.3)]}}
    trials = [
        dq.Trial("p.png", "dog", (1, 0), (2, 2), 0.9),   # bottom-left: centre (0.25, 0.75) inside -> hit
        dq.Trial("p.png", "Dog", (0, 1), (2, 2), 0.2),   # top-right: outside -> miss (case-insensitive word)
        dq.Trial("p.png", "ball", (0, 1), (2, 2), 0.7),  # top-right centre (0.75, 0.25) inside -> hit
        dq.Trial("p.png", "cat", (0, 0), (2, 2), 0.5),   # not labelled: ignored
        dq.Trial("q.png", "dog", (0, 0), (2, 2), 0.5),   # photo not labelled: ignored
    ]
    out = dq.pointing_game(trials, boxes)
    assert (out["hits"], out["trials"], out["pointing_game"]) == (2, 3, 66.67)
    assert out["chance"] == pytest.approx(100 * (0.5 + 0.5 + 0.25) / 3, abs=0.01)  # dog 2/4 cells, ball 1/4
    assert out["per_word"] == {"ball": [1, 1], "dog": [1, 2]}
    assert out["mean_confidence_hit"] == pytest.approx(0.8) and out["mean_confidence_miss"] == pytest.approx(0.2)
    assert dq.pointing_game([], boxes)["trials"] == 0


@pytest.fixture(scope="module")
def demo_figures(tmp_path_factory):
    pytest.importorskip("skimage", reason="the demo photos come with scikit-image")
    return dq.run(device="cpu", work=tmp_path_factory.mktemp("demo-quality"))


@pytest.mark.slow
def test_demo_figures_are_well_formed(demo_figures):
    assert demo_figures["images"] == len(SAMPLE_PHOTOS)
    assert demo_figures["plain_queries"]["queries"] == len(dq.load_queries())
    assert demo_figures["pointing"]["trials"] >= 50  # the explain output grounds the labelled words
    assert 0 <= demo_figures["pointing"]["chance"] <= 100


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=TARGET)
def test_plain_queries_find_their_photo(demo_figures):
    plain = demo_figures["plain_queries"]
    assert plain["r1"] >= 80.0 and plain["r5"] == 100.0, demo_figures["misses_at_1"]


@pytest.mark.slow
def test_demo_captions_put_their_photo_first(demo_figures):
    assert demo_figures["captions"]["right_first"] >= 75.0, demo_figures["misses_at_1"]


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=TARGET)
def test_pointing_game_on_the_labelled_demo_boxes(demo_figures):
    assert demo_figures["pointing"]["pointing_game"] >= 70.0, demo_figures["pointing"]["per_word"]


@pytest.mark.slow
def test_shipped_model_keeps_its_demo_figures(demo_figures):
    assert demo_figures["plain_queries"]["r1"] >= SHIPPED["plain_r1"], demo_figures["misses_at_1"]
    assert demo_figures["plain_queries"]["r5"] >= SHIPPED["plain_r5"], demo_figures["misses_at_1"]
    assert demo_figures["captions"]["right_first"] >= SHIPPED["captions_right_first"], demo_figures["misses_at_1"]
    assert demo_figures["match"]["nonsense_with_no_match"] >= 95.0  # "nothing matches" for nonsense


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="the match signal's demo target: 80% of right first hits flagged (the "
                   "shipped model's reference-or-collection test, checked once: plain queries 11 of 18, captions 9 of 18)")
def test_right_first_hits_on_the_demo_are_flagged_as_matches(demo_figures):
    for part in ("plain_queries", "captions"):
        assert demo_figures["match"][part]["flagged"] >= 80.0, demo_figures["match"]


def test_script_entries_answer_bad_input_in_one_line(capsys, tmp_path):
    from alignsearch.bench import min_score, package_photos

    for main in (dq.main, min_score.main, package_photos.main):
        assert main(["--bogus"]) == 2
        assert main([str(tmp_path / "no-model")]) == 2
        err = capsys.readouterr().err.strip()
        assert "no-model" in err and "Traceback" not in err
