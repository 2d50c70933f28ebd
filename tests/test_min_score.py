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
from alignsearch.models.reference import (REFERENCE_FILE, MatchRule, ReferenceBank, collection_score,
                                          load_reference, relevance, save_reference)

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
    rule = MatchRule(1.0, 0.05)  # thresholds 0.25
    out = ms.right_first_flagged(ranked, [{0}, {2}, {0}], rule)
    assert out == {"right_first": 2, "right_first_flagged": 100.0, "wrong_first_flagged": 0.0}
    assert ms.no_match_rate(ranked, rule) == pytest.approx(33.33)
    assert ms.no_match_rate(ranked, MatchRule(1.0, 0.25)) == pytest.approx(66.67)
    # a collection test rescues the third query: its hit stands 0.05 above the collection's M-th best
    ranked.collection = np.array([0.4, 0.3, 0.0])
    assert ms.no_match_rate(ranked, MatchRule(1.0, 0.25, gap=0.05)) == pytest.approx(33.33)


def _row(family, no_match, flagged, strictness):
    return {"family": family, "params": (), "no_match": no_match, "flagged": flagged, "strictness": strictness}


def test_the_selection_rule_maximises_flagged_hits_above_the_nonsense_floor():
    grid = [_row("RQ", 80.0, 99.0, 0.9), _row("RQ", 97.5, 90.0, 1.01), _row("RQ", 98.0, 89.8, 1.0),
            _row("RQ", 100.0, 60.0, 1.05), _row("LIN", 99.0, 95.0, 1.0), _row("RZ|CG", 97.0, 95.3, 3.0),
            _row("CG", 97.0, 95.2, 0.1)]
    row, ok = ms.choose_rule(grid)
    assert ok and row is grid[4]  # within 0.5 points of the best, the higher no-match rate wins
    row, ok = ms.choose_rule(grid[:4])
    assert ok and row is grid[2]  # 89.8 is within 0.5 of 90.0 and keeps more nonsense out
    row, ok = ms.choose_rule([_row("RZ|CG", 98.0, 95.0, 2.0), _row("CG", 98.0, 95.0, 0.2)])
    assert row["family"] == "CG"  # a full tie: the family with fewer parameters
    row, ok = ms.choose_rule(grid, floor=100.5)
    assert not ok and row is grid[3]  # none meets it: the strictest reference quantile rule


def test_grid_thresholds_are_the_product_s_thresholds():
    rng = np.random.default_rng(2)
    ref = np.sort(rng.normal(0.05, 0.04, size=(6, 200)), axis=1).astype(np.float32)
    st = ms.RefStats.of(ref)
    s = ms.Summary(first=rng.uniform(0, 0.4, 9), best=rng.uniform(0.2, 0.5, 9), right=None,
                   query=np.array([0, 1, 2, 3, 4, 5, 0, 1, 2]), collection=rng.uniform(0.0, 0.3, 9))
    for family, params in [("RQ", (0.99, 0.02)), ("RZ", (3.5,)), ("CG", (0.05,)), ("RZ|CG", (4.0, 0.08)),
                           ("RQ|CG", (0.95, 0.1, 0.07)), ("LIN", (0.3, 0.7, 0.9))]:
        ms._check_product(family, params, {"set": (s, st)})  # raises when they differ


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


def test_match_rule_families_are_thresholds_on_the_global_score():
    ref = np.linspace(0.0, 0.2, 101)  # mean 0.1, sd ~0.0583
    sd = ref.std()
    assert MatchRule(z=2.0).threshold(ref) == pytest.approx(0.1 + 2 * sd)
    assert MatchRule(gap=0.05).threshold(ref, 0.3) == pytest.approx(0.35)
    assert MatchRule(gap=0.05).threshold(ref, None) == np.inf  # no collection score: no test
    either = MatchRule(z=2.0, gap=0.05)  # a hit matches when it clears either: the lower threshold
    assert either.threshold(ref, 0.3) == pytest.approx(0.1 + 2 * sd)
    assert either.threshold(ref, 0.1) == pytest.approx(0.15)
    assert either.threshold(ref, float("nan")) == pytest.approx(0.1 + 2 * sd)
    # linear: a z + b gap >= c, solved for the score; a hit at the threshold sits on the line
    a, b, c = 0.4, 0.6, 1.0
    thr = float(MatchRule(linear=(a, b, c)).threshold(ref, 0.2))
    assert a * (thr - 0.1) / sd + b * (thr - 0.2) == pytest.approx(c)
    assert MatchRule(linear=(a, b, c)).threshold(ref, None) == pytest.approx(0.1 + c * sd / a)
    both = MatchRule(z=2.0, gap=0.05).threshold(np.stack([ref, ref]), np.array([0.3, 0.1]))
    assert both == pytest.approx([0.1 + 2 * sd, 0.15])  # one threshold per query
    for bad in [dict(), dict(quantile=1.5), dict(z=float("nan")), dict(linear=(-1.0, 1.0, 0.0)),
                dict(gap=0.1, collection_m=0), dict(gap=0.1, collection_m=10**6)]:
        with pytest.raises(ValueError):
            MatchRule(**bad)


def test_collection_score_is_the_m_th_best_or_the_lowest_of_a_small_collection():
    assert collection_score(np.array([0.1, 0.5, 0.3, 0.2]), m=2) == pytest.approx(0.3)
    assert collection_score(np.array([0.1, 0.5, 0.3]), m=10) == pytest.approx(0.1)
    assert np.isnan(collection_score(np.array([0.4]), m=10)) and np.isnan(collection_score(np.array([]), m=3))


def test_rules_round_trip_and_old_calibration_files_keep_their_meaning():
    old = {"quantile": 0.9, "margin": 0.145}  # what calibration.json held before collection tests
    rule = MatchRule.from_dict(old)
    assert rule == MatchRule(0.9, 0.145) and not rule.uses_collection and rule.to_dict() == old
    ref = np.linspace(0.0, 0.2, 101)
    assert rule.threshold(ref, 0.9) == pytest.approx(np.quantile(ref, 0.9) + 0.145)  # collection score ignored
    for new in [MatchRule(z=3.0, gap=0.06), MatchRule(linear=(0.5, 0.5, 2.0), collection_m=5),
                MatchRule(0.99, 0.01, gap=0.1)]:
        assert MatchRule.from_dict(json.loads(json.dumps(new.to_dict()))) == new and new.uses_collection
    for bad in [{"z": "3"}, {"gap": True}, {"linear": [1, 2]}, {"linear": "abc"}, {"gap": 0.1, "collection_m": 2.5},
                {"margin": 0.1}, [], "x"]:
        assert MatchRule.from_dict(bad) is None


def test_mark_matches_uses_the_collection_score_of_the_result(bank):
    ref = np.sort(np.linspace(-0.1, 0.2, 100).astype(np.float32))
    calibration = {"match": {"text": {"quantile": 1.0, "margin": 0.1, "gap": 0.05, "collection_m": 10}}}
    searcher = _searcher(calibration, bank)
    assert searcher.collection_m(True) == 10 and searcher.collection_m(False) == ms.COLLECTION_M
    # reference threshold 0.3; the collection's 10th best is 0.1: the collection test's threshold 0.15 is lower
    result = _result([0.2, 0.16, 0.12], ref)
    result.collection = 0.1
    marked = searcher.mark_matches(result)
    assert marked.match_test == "reference" and marked.min_score == pytest.approx(0.15)
    assert [h.match for h in marked.hits] == [True, True, False]
    # the same hits in a collection where everything scores alike: only the reference test, nothing clears it
    crowded = _result([0.2, 0.16, 0.12], ref)
    crowded.collection = 0.19
    assert searcher.mark_matches(crowded).no_match and crowded.min_score == pytest.approx(0.24)
    # a collection test alone without a collection score (one item): no test, match null
    alone = _searcher({"match": {"text": {"gap": 0.05}}}, bank).mark_matches(_result([0.2], ref))
    assert alone.match_test is None and alone.min_score is None and alone.hits[0].match is None


def test_a_batch_is_marked_as_each_of_its_results_alone(bank):
    """``mark_all`` (what the server's batches run) gives every result what ``mark_matches`` gives it alone: its
    own request threshold, reference rule, collection score, side, or none."""
    ref = np.sort(np.linspace(-0.1, 0.2, 100).astype(np.float32))
    ref2 = np.sort(np.linspace(0.0, 0.3, 100).astype(np.float32))
    calibration = {"match": {"text": {"quantile": 0.9, "margin": 0.05, "gap": 0.05, "collection_m": 10},
                             "image": {"z": 2.0}}}
    searcher = _searcher(calibration, bank)

    def batch():
        results = [_result([0.3, 0.2, 0.1], ref), _result([0.3, 0.25], ref2), _result([0.2, 0.1], ref),
                   _result([0.1, 0.0], ref, query_is_text=False), _result([0.2], None)]
        results[1].collection = 0.1
        results[2].collection = 0.19
        return results, [None, None, 0.15, None, None]

    alone = [searcher.mark_matches(r, m) for r, m in zip(*batch())]
    together = searcher.mark_all(*batch())
    for a, b in zip(alone, together):
        assert (a.min_score, a.match_test, a.no_match) == (b.min_score, b.match_test, b.no_match)
        assert [(h.match, h.relevance) for h in a.hits] == [(h.match, h.relevance) for h in b.hits]
    assert [r.match_test for r in together] == ["reference", "reference", "min_score", "reference", None]


def test_an_old_calibration_file_still_works_in_a_model_folder(tmp_path):
    from alignsearch.models.factory import load_model

    folder = tmp_path / "m"
    shutil.copytree(PRETRAINED_DIR / "default", folder)
    old = {"match": {"text": {"quantile": 0.9, "margin": 0.145}, "image": {"quantile": 0.98, "margin": 0.13}},
           "on": "global_score"}
    (folder / "calibration.json").write_text(json.dumps(old))
    model = load_model(str(folder))
    searcher = _searcher(model.calibration, model.reference)
    assert searcher.match_rule(True) == MatchRule(0.9, 0.145) and searcher.match_rule(False) == MatchRule(0.98, 0.13)
    ref = model.reference.scores(model.encode_texts(["a dog on the grass"]).global_emb.numpy(), True)[0]
    result = _result([0.9, -0.5], ref)
    result.collection = 0.95  # ignored by a rule without a collection test
    marked = searcher.mark_matches(result)
    assert marked.min_score == pytest.approx(float(np.quantile(ref.astype(np.float64), 0.9) + 0.145), abs=1e-6)
    assert [h.match for h in marked.hits] == [True, False]
