"""Scoring apart from identity: one ScoringConfig that the Searcher, a request and training's w sweep use,
and they agree with one another."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import N_IMAGES, encode_as_built
from alignsearch.indexer.index import Index
from alignsearch.indexer.search import Searcher
from alignsearch.models import load_model
from alignsearch.models.evaluation import keep_top_k
from alignsearch.models.scoring import ScoringConfig, inner_products

QUERIES = ["a cat looks to the side", "a red motorbike", "a cup of coffee", "galaxies in deep space"]


@pytest.fixture(scope="module")
def model():
    return load_model(device="cpu")


@pytest.fixture(scope="module")
def dense(built, model):
    """Every indexed image encoded afresh, in row order, and the queries."""
    index = Index(built)
    ids = [r["id"] for r in index.conn.execute("SELECT id FROM images ORDER BY row")]
    return ids, encode_as_built(model, [index.images_root / i for i in ids]), model.encode_texts(QUERIES)


def test_bad_scoring_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown alignment"):
        ScoringConfig(alignment="MaxMax")
    with pytest.raises(ValueError, match="local_weight"):
        ScoringConfig(local_weight=float("nan"))
    with pytest.raises(ValueError, match="lse_lambda"):
        ScoringConfig(lse_lambda=0)
    assert ScoringConfig().override(local_weight=None, alignment="CHAN-lse").alignment == "LSE-norm"  # old name


def test_model_config_gives_the_default_scoring(model):
    scoring = model.config.scoring()
    assert (scoring.alignment, scoring.local_weight, scoring.lse_lambda) == (
        model.config.alignment, model.config.local_weight, model.config.lse_lambda)


@pytest.mark.parametrize("scoring", [ScoringConfig("LSE-norm", 0.5, 5.0), ScoringConfig("CHAN-logsumexp", 0.05),
                                     ScoringConfig("MrAVGw", 1.0)])
def test_a_request_scoring_overrides_the_searcher_and_matches_the_dense_scores(built, model, dense, scoring):
    ids, images, texts = dense
    searcher = Searcher(Index(built), model)
    results = searcher.search_text_encoded(texts, k=N_IMAGES, candidates=N_IMAGES, scoring=scoring)
    expected = scoring.fuse(texts.global_emb @ images.global_emb.T,
                            scoring.local(texts.local, texts.mask, images.local, images.mask))
    for q, res in enumerate(results):
        for hit in res.hits:
            assert hit.score == pytest.approx(float(expected[q, ids.index(hit.id)]), abs=2e-3)
            assert hit.score == pytest.approx(hit.global_score + scoring.local_weight * hit.local_score, abs=1e-5)
    default = searcher.search_text_encoded(texts, k=3, candidates=N_IMAGES)
    assert default[0].hits[0].score != results[0].hits[0].score  # the override did not stick


def test_weight_zero_ranks_by_the_global_score(built, model, dense):
    _, _, texts = dense
    searcher = Searcher(Index(built), model, scoring=ScoringConfig(local_weight=0.0))
    for res in searcher.search_text_encoded(texts, k=N_IMAGES, candidates=N_IMAGES):
        assert [h.score for h in res.hits] == sorted((h.global_score for h in res.hits), reverse=True)


def test_training_sweep_and_searcher_rank_the_same_candidates_the_same_way(built, model, dense):
    """Training's w sweep scores dense matrices cut to the global top K (models.evaluation.keep_top_k); the
    Searcher reranks FAISS's top K. For each weight the two rankings agree."""
    ids, images, texts = dense
    searcher = Searcher(Index(built), model)
    g = texts.global_emb @ images.global_emb.T
    local = model.local_scores(texts, images)
    k = 5
    for weight in (0.0, 0.2, 1.0):
        scoring = model.config.scoring().override(local_weight=weight)
        cut = keep_top_k(scoring.fuse(g, local), g, k, dim=1)
        for q, res in enumerate(searcher.search_text_encoded(texts, k=k, candidates=k, scoring=scoring)):
            expected = [ids[i] for i in torch.argsort(cut[q], descending=True)[:k].tolist()]
            assert {h.id for h in res.hits} == set(expected)
            scores = sorted(cut[q][torch.isfinite(cut[q])].tolist(), reverse=True)
            if all(a - b > 4e-3 for a, b in zip(scores, scores[1:])):
                assert [h.id for h in res.hits] == expected


def test_inner_products_are_numpy_s_product_in_float32():
    rng = np.random.default_rng(0)
    queries, vectors = rng.standard_normal((5, 24)), rng.standard_normal((40, 24)).astype(np.float32)
    got = inner_products(queries, vectors)  # float64 queries are taken as float32
    assert got.dtype == np.float32 and got.shape == (5, 40)
    np.testing.assert_allclose(got, queries.astype(np.float32) @ vectors.T, rtol=0, atol=1e-5)
    assert inner_products(queries[:0], vectors).shape == (0, 40)
