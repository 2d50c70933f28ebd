"""The match signal's calibration (bench.min_score), the reference bank (models.reference) and the Searcher's
choice of test (reference bank, a fixed min_score, none)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from alignsearch.bench import min_score as ms
from alignsearch.indexer.search import Hit, Searcher, SearchResult
from alignsearch.models.factory import PRETRAINED_DIR, load_calibration, model_fingerprint
from alignsearch.models.reference import (REFERENCE_FILE, MatchRule, ReferenceBank, load_reference, relevance,
                                          save_reference)

D = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def bank() -> ReferenceBank:
    rng = np.random.default_rng(0)
    return ReferenceBank(_unit(rng.normal(size=(500, D))), _unit(rng.normal(size=(300, D))))


def test_nonsense_queries_are_fixed_for_a_seed_and_varied():
    a, b = ms.nonsense_queries(40, seed=3), ms.nonsense_queries(40, seed=3)
    assert a == b and a != ms.nonsense_queries(40, seed=4)
    assert len(set(a)) == 40 and all(q.strip() for q in a)
    assert any(q.replace(" ", "").isdigit() for q in a) and any(q.replace(" ", "").isalpha() for q in a)


def test_nonsense_images_are_fixed_for_a_seed():
    a, b = ms.nonsense_images(8, seed=1), ms.nonsense_images(8, seed=1)
    assert [np.asarray(x).tobytes() for x in a] == [np.asarray(x).tobytes() for x in b]
    assert all(x.size == (224, 224) and x.mode == "RGB" for x in a)
    assert len({np.asarray(x).tobytes() for x in a}) == 8


def test_the_rule_is_a_quantile_of_the_query_s_own_reference_scores_plus_a_margin():
    ref = np.sort(np.linspace(0.0, 0.99, 100))
    assert MatchRule(1.0, 0.05).threshold(ref) == pytest.approx(1.04)
    assert MatchRule(0.5, 0.0).threshold(ref) == pytest.approx(0.495)
    two = np.stack([ref, ref - 0.5])  # a query that scores everything lower gets a lower threshold
    assert MatchRule(0.99, 0.01).threshold(two) == pytest.approx([0.9901, 0.4901])  # 0.9801 interpolated, + 0.01
    assert MatchRule.from_dict({"quantile": 0.99, "margin": 0.02}) == MatchRule(0.99, 0.02)
    assert MatchRule.from_dict({"quantile": "x"}) is None and MatchRule.from_dict(None) is None
    with pytest.raises(ValueError):
        MatchRule(1.5)
    assert relevance(0.505, ref) == 51.0 and relevance(-1.0, ref) == 0.0 and relevance(2.0, ref) == 100.0


def test_reference_test_flags_a_constructed_right_hit_and_not_a_random_one(bank):
    rng = np.random.default_rng(1)
    query = _unit(rng.normal(size=D))
    right = _unit(query + 0.4 * _unit(rng.normal(size=D)))  # cosine ~0.9 with the query
    random_hit = _unit(rng.normal(size=D))
    ref = bank.scores(query[None], query_is_text=True)[0]
    assert np.all(np.diff(ref) >= 0) and len(ref) == len(bank.images)
    rule = MatchRule(0.99, 0.02)
    thr = float(rule.threshold(ref))
    assert float(right @ query) >= thr > float(random_hit @ query)
    assert relevance(float(right @ query), ref) == 100.0 and relevance(float(random_hit @ query), ref) < 99.0
    # an image query is compared with the captions of the bank
    assert bank.scores(query[None], query_is_text=False).shape == (1, len(bank.captions))


def _searcher(calibration: dict, reference: ReferenceBank | None) -> Searcher:
    searcher = Searcher.__new__(Searcher)  # mark_matches needs only the model's calibration and bank
    searcher.model = SimpleNamespace(calibration=calibration, reference=reference)
    return searcher


def _result(scores: list[float], reference: np.ndarray | None, query_is_text: bool = True) -> SearchResult:
    hits = [Hit(i, f"h{i}", s, s, 0.0, None, None, None, {}) for i, s in enumerate(scores)]
    return SearchResult(hits, reference=reference, query_is_text=query_is_text)


def test_mark_matches_prefers_the_request_then_the_bank_then_a_fixed_min_score(bank):
    rules = {"match": {"text": {"quantile": 1.0, "margin": 0.05}, "image": {"quantile": 0.5, "margin": 0.0}}}
    ref = np.sort(np.linspace(-0.1, 0.2, 100).astype(np.float32))
    with_bank = _searcher({**rules, "min_score": 0.9}, bank)
    marked = with_bank.mark_matches(_result([0.3, 0.24, 0.1], ref))
    assert marked.match_test == "reference" and marked.min_score == pytest.approx(0.25)
    assert [h.match for h in marked.hits] == [True, False, False] and not marked.no_match
    assert [h.relevance for h in marked.hits] == [100.0, 100.0, 66.0]
    image = with_bank.mark_matches(_result([0.1, 0.0], ref, query_is_text=False))  # the image rule
    assert image.min_score == pytest.approx(0.05) and [h.match for h in image.hits] == [True, False]
    nothing = with_bank.mark_matches(_result([0.2, 0.1], ref))
    assert nothing.no_match and not any(h.match for h in nothing.hits)
    asked = with_bank.mark_matches(_result([0.2, 0.1], ref), min_score=0.15)  # the request's own threshold
    assert asked.match_test == "min_score" and [h.match for h in asked.hits] == [True, False]
    assert asked.hits[0].relevance is not None  # relevance is reported whatever the threshold
    # an older model folder: no bank, a fixed min_score
    old = _searcher({"min_score": 0.15}, None).mark_matches(_result([0.2, 0.1], None))
    assert old.match_test == "min_score" and old.min_score == 0.15 and [h.match for h in old.hits] == [True, False]
    assert old.hits[0].relevance is None
    # neither: no test
    bare = _searcher({}, None).mark_matches(_result([0.2], None))
    assert bare.min_score is None and bare.match_test is None and bare.hits[0].match is None and not bare.no_match
    # a bank without a rule for the side falls back to the fixed min_score
    no_rule = _searcher({"min_score": 0.15}, bank).mark_matches(_result([0.2], ref, query_is_text=True))
    assert no_rule.match_test == "min_score"


def test_measures_count_right_first_hits_and_nonsense_queries_with_no_match():
    ranked = ms.Ranked(items=np.array([[0, 1], [2, 0], [1, 2]]),
                       global_scores=np.array([[0.5, 0.1], [0.3, 0.2], [0.05, 0.0]]),
                       reference=np.tile(np.linspace(0.0, 0.2, 11), (3, 1)))
    out = ms.right_first_flagged(ranked, [{0}, {2}, {0}], quantile=1.0, margin=0.05)  # thresholds 0.25
    assert out == {"right_first": 2, "right_first_flagged": 100.0, "wrong_first_flagged": 0.0}
    assert ms.no_match_rate(ranked, 1.0, 0.05) == pytest.approx(33.33)
    assert ms.no_match_rate(ranked, 1.0, 0.25) == pytest.approx(66.67)


def test_the_selection_rule_maximises_flagged_hits_above_the_nonsense_floor():
    grid = [{"quantile": 0.9, "margin": 0.0, "no_match": 80.0, "flagged": 99.0},
            {"quantile": 0.99, "margin": 0.02, "no_match": 97.5, "flagged": 90.0},
            {"quantile": 1.0, "margin": 0.0, "no_match": 98.0, "flagged": 90.0},
            {"quantile": 1.0, "margin": 0.05, "no_match": 100.0, "flagged": 60.0}]
    row, ok = ms.choose_rule(grid)
    assert ok and (row["quantile"], row["margin"]) == (1.0, 0.0)  # the tie goes to the higher no-match rate
    row, ok = ms.choose_rule(grid, floor=100.5)
    assert not ok and (row["quantile"], row["margin"]) == (1.0, 0.05)  # none meets it: the strictest


def test_bank_round_trips_and_stays_out_of_the_fingerprint(tmp_path, bank):
    shipped = PRETRAINED_DIR / "default"
    folder = tmp_path / "m"
    shutil.copytree(shipped, folder)
    before = model_fingerprint(folder)
    save_reference(folder, bank.images, bank.captions, {"from": "test"})
    loaded = load_reference(folder)
    assert loaded.images.shape == bank.images.shape and loaded.captions.shape == bank.captions.shape
    assert np.abs(loaded.images - bank.images).max() < 1e-3  # float16 on disk
    assert model_fingerprint(folder) == before
    (folder / REFERENCE_FILE).write_bytes(b"not safetensors")
    assert load_reference(folder) is None
    (folder / REFERENCE_FILE).unlink()
    assert load_reference(folder) is None


def test_calibration_file_is_read_with_the_model_and_left_out_of_its_fingerprint(tmp_path):
    shipped = PRETRAINED_DIR / "default"
    rules = load_calibration(shipped)["match"]
    assert {"text", "image"} <= set(rules) and all(MatchRule.from_dict(r) for r in rules.values())
    assert load_reference(shipped) is not None
    folder = tmp_path / "m"
    shutil.copytree(shipped, folder)
    (folder / "calibration.json").write_text(json.dumps({"min_score": 0.5}))
    assert load_calibration(folder) == {"min_score": 0.5}
    assert model_fingerprint(folder) == model_fingerprint(shipped)
    (folder / "calibration.json").write_text("{not json")
    assert load_calibration(folder) == {}
    (folder / "calibration.json").unlink()
    assert load_calibration(folder) == {}
