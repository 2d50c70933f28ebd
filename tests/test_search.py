"""The search pipeline over a real index: two-stage search equals the exhaustive computation (both directions,
whole rankings), equals reranking the global top-K, deterministic ties, FAISS index types (IVF probes, HNSW
tombstones), the encoded entry points the service uses, and opening with the manifest's model."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from conftest import N_IMAGES, build_index, encode_as_built, sample_files
from alignsearch.indexer import rerank
from alignsearch.indexer.index import Index, verify
from alignsearch.indexer.search import Searcher
from alignsearch.models import load_model
from alignsearch.models.preprocess import load_image
from alignsearch.models.reference import COLLECTION_M
from alignsearch.models.words import content_words
from alignsearch.cli import main

TOL = 2e-3  # SQfp16 decoding of the local vectors moves fused scores by less than this
QUERIES = ["a dog runs through the grass", "children playing", "a man on a bike", "people in the snow",
           "a girl in a pink dress"]


@pytest.fixture(scope="module")
def model():
    return load_model(device="cpu")


@pytest.fixture(scope="module")
def searcher(built, model):
    return Searcher(Index(built), model, rerank_precision="float32")  # exact: compared with exhaustive scores


@pytest.fixture(scope="module")
def encoded(searcher, model):
    """Exhaustive side: every indexed image and caption encoded afresh, in row order."""
    index = searcher.index
    image_ids = [r["id"] for r in index.conn.execute("SELECT id FROM images ORDER BY row")]
    captions = index.conn.execute("SELECT id, text FROM captions ORDER BY row").fetchall()
    images = encode_as_built(model, [index.images_root / i for i in image_ids])
    texts = model.encode_texts([c["text"] for c in captions])
    return image_ids, images, [c["id"] for c in captions], texts


def _same_ranking(hits, expected: dict[str, float]) -> None:
    """Every item returned once, each score within TOL of the exhaustive score, and the order the exhaustive
    order except swaps of items whose exhaustive scores are within 2 * TOL."""
    assert sorted(h.id for h in hits) == sorted(expected)
    for h in hits:
        assert h.score == pytest.approx(expected[h.id], abs=TOL), h.id
    exact = [expected[h.id] for h in hits]
    for a, b in zip(exact, exact[1:]):
        assert a >= b - 2 * TOL
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_text_to_image_equals_exhaustive_over_the_whole_ranking(searcher, model, encoded):
    image_ids, images, _, _ = encoded
    exhaustive = model.scores(model.encode_texts(QUERIES), images)
    results = searcher.search_text(QUERIES, k=N_IMAGES, candidates=N_IMAGES)
    for q, res in enumerate(results):
        _same_ranking(res.hits, dict(zip(image_ids, exhaustive[q].tolist())))
        assert set(res.timings_ms) == {"encode", "coarse", "rerank", "total"}
        for h in res.hits:
            assert h.score == pytest.approx(h.global_score + model.config.local_weight * h.local_score, abs=1e-5)


def test_image_to_caption_equals_exhaustive_over_the_whole_ranking(searcher, model, encoded):
    image_ids, _, caption_ids, texts = encoded
    queries = [load_image(searcher.index.images_root / i) for i in image_ids[:3]]
    exhaustive = model.scores(texts, model.encode_images(queries)).T  # images x captions
    results = searcher.search_image(queries, k=len(caption_ids), candidates=len(caption_ids))
    for q, res in enumerate(results):
        _same_ranking(res.hits, dict(zip(caption_ids, exhaustive[q].tolist())))
        assert all(h.caption and h.uri is None for h in res.hits)


def test_two_stage_reranks_exactly_the_global_top_k(searcher, model, encoded):
    image_ids, images, _, _ = encoded
    texts = model.encode_texts(QUERIES)
    k = 5
    for q, res in enumerate(searcher.search_text_encoded(texts, k=3, candidates=k)):
        top = torch.argsort(texts.global_emb[q] @ images.global_emb.T, descending=True)[:k].tolist()
        fused = model.scores(texts.select([q]), images.select(top))[0]
        expected = {image_ids[i]: s for i, s in zip(top, fused.tolist())}
        assert {h.id for h in res.hits} <= set(expected)
        best = sorted(expected, key=expected.get, reverse=True)[:3]
        if all(abs(expected[best[i]] - expected[best[i + 1]]) > 2 * TOL for i in range(2)):
            assert [h.id for h in res.hits] == best


def test_encoded_entry_points_match_the_plain_ones(searcher, model):
    plain = searcher.search_text(QUERIES[:2], k=4, candidates=8)
    enc = searcher.search_text_encoded(model.encode_texts(QUERIES[:2]), k=4, candidates=8)
    assert [[h.id for h in r.hits] for r in plain] == [[h.id for h in r.hits] for r in enc]
    assert "encode" not in enc[0].timings_ms and plain[0].timings_ms["encode"] > 0


def test_explain_grounds_every_query_word_in_a_grid_cell(searcher, model):
    res = searcher.search_text(["a black dog jumps"], k=2, candidates=4, explain=True)[0]
    rows, cols = model.region_grid()
    for hit in res.hits:
        words = [g["word"] for g in hit.grounding]
        assert words == ["black", "dog", "jumps"]  # whole words, no stopwords
        for g in hit.grounding:
            assert 0 <= g["region"] < rows * cols and g["cell"] == [g["region"] // cols, g["region"] % cols]
            assert -1.0 <= g["similarity"] <= 1.0 and 1 / (rows * cols) <= g["confidence"] <= 1.0
    res = searcher.search_image([load_image(searcher.index.images_root / res.hits[0].uri)], k=2, candidates=4,
                                explain=True)[0]
    assert all(h.grounding and len(h.grounding) > 0 for h in res.hits)
    for h in res.hits:  # caption hits: one entry per content word of the caption
        assert [g["word"] for g in h.grounding] == [w.text for w in content_words(model.tokenize([h.caption]).words[0])]


def test_get_image_and_hit_metadata(searcher):
    hit = searcher.search_text(["a dog"], k=1, candidates=5)[0].hits[0]
    row = searcher.get_image(hit.id)
    assert row["id"] == hit.id and Path(row["file"]).is_file()
    assert hit.metadata["width"] == row["width"] and hit.uri == row["path"]
    assert searcher.get_image("no-such-image.jpg") is None
    caption = searcher.search_image([load_image(row["file"])], k=1, candidates=5)[0].hits[0]
    assert caption.metadata.get("source") in ("demo", "user")


@pytest.mark.slow
def test_ties_are_broken_by_row_id(photos, model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    real = sample_files(photos[0])
    for name in ("c.jpg", "a.jpg", "b.jpg"):
        shutil.copy(real[0], images / name)  # three identical photos: identical scores
    shutil.copy(real[1], images / "other.jpg")
    assert main(["index", "build", "--images", str(images), "--out", str(tmp_path / "idx"), "--quiet"]) == 0
    searcher = Searcher(Index(tmp_path / "idx"), model)
    for _ in range(3):
        hits = searcher.search_text(["a photo"], k=4, candidates=4)[0].hits
        dupes = [h for h in hits if h.id != "other.jpg"]
        assert [h.id for h in dupes] == ["a.jpg", "b.jpg", "c.jpg"]  # rows in path order, equal scores
        assert len({h.score for h in dupes}) == 1


@pytest.mark.slow
@pytest.mark.parametrize("factory", ["IVF4,Flat", "HNSW32,Flat"])
def test_approximate_global_indexes_agree_with_flat(photos, built, model, tmp_path, factory):
    """IVF is searched with enough probes (not FAISS's default of one) and HNSW keeps tombstones, which the
    search skips by fetching that many more candidates."""
    out = tmp_path / "idx"
    assert build_index(*photos, out, "--faiss-factory", factory) == 0
    searcher, flat = Searcher(Index(out), model), Searcher(Index(built), model)
    assert searcher.index.manifest["collections"]["images"]["factory"] == factory
    got = searcher.search_text(QUERIES, k=N_IMAGES, candidates=N_IMAGES)
    want = flat.search_text(QUERIES, k=N_IMAGES, candidates=N_IMAGES)
    assert [[h.id for h in r.hits] for r in got] == [[h.id for h in r.hits] for r in want]
    victims = [h.id for h in got[0].hits[:3]]
    assert main(["index", "delete", str(out), "--ids", *victims]) == 0
    assert verify(out) == []
    searcher = Searcher(Index(out), model)
    if factory.startswith("HNSW"):
        assert searcher.index.images.index.count() == N_IMAGES  # HNSW cannot remove: tombstones only
        assert not searcher.index.images.index.real_deletes
    for res in searcher.search_text(QUERIES, k=5, candidates=5):
        ids = [h.id for h in res.hits]
        assert not set(victims) & set(ids) and len(ids) == 5
    assert len(searcher.search_text(["x"], k=N_IMAGES, candidates=N_IMAGES)[0].hits) == N_IMAGES - 3


def test_open_loads_the_model_named_in_the_manifest(built, model):
    searcher = Searcher.open(built, device="cpu")
    assert searcher.model.fingerprint == model.fingerprint
    assert Searcher.open(built, model).model is model


def test_gpu_copy_is_used_up_to_its_k_limit(built, model, monkeypatch):
    """With faiss-gpu the coarse stage runs on a GPU copy; beyond the GPU's k limit it falls back to the CPU
    original. The GPU is stood in for here by a wrapper that refuses large k, as FAISS's GPU indexes do."""
    from alignsearch.indexer import faiss_index

    class FakeGpu:
        def __init__(self, index):
            self.index, self.ntotal, self.calls = index, index.ntotal, []

        def search(self, queries, k):
            assert k <= faiss_index.GPU_MAX_K
            self.calls.append(k)
            return self.index.search(queries, k)

    monkeypatch.setattr(faiss_index, "to_gpu", FakeGpu)
    monkeypatch.setattr(faiss_index, "GPU_MAX_K", 12)
    index = Index(built)
    store = index.images.index
    assert isinstance(store.index, FakeGpu) and store.cpu_index is not store.index
    searcher, plain = Searcher(index, model), Searcher(Index(built, use_gpu=False), model)
    for k in (5, N_IMAGES):  # N_IMAGES > 12: the CPU original answers
        assert [h.id for h in searcher.search_text(QUERIES[:1], k=k, candidates=k)[0].hits] == \
               [h.id for h in plain.search_text(QUERIES[:1], k=k, candidates=k)[0].hits]
    assert store.index.calls == [COLLECTION_M]  # k = 5 fetches the match test's 10 best: still on the GPU


def test_reference_test_tells_matches_from_weak_hits(searcher, model):
    assert searcher.reference_bank is not None and searcher.match_rule(True) and searcher.match_rule(False)
    nonsense, real = searcher.search_text(["zzzz qqqq", "a red motorcycle"], k=5, candidates=N_IMAGES)
    assert nonsense.min_score is None and not nonsense.no_match and all(h.match is None for h in nonsense.hits)
    assert nonsense.reference is not None and len(nonsense.reference) == len(searcher.reference_bank.images)
    ids = [h.id for h in nonsense.hits]
    marked = searcher.mark_matches(nonsense)
    assert [h.id for h in marked.hits] == ids  # hits and ranks unchanged
    assert marked.match_test == "reference" and marked.no_match and not any(h.match for h in marked.hits)
    real = searcher.mark_matches(real)
    assert real.match_test == "reference" and not real.no_match and real.hits[0].match
    assert real.min_score != marked.min_score  # each query its own threshold
    assert all(h.match == (h.global_score >= real.min_score) for h in real.hits)
    assert all(0 <= h.relevance <= 100 for h in real.hits) and real.hits[0].relevance > marked.hits[0].relevance
    assert not searcher.mark_matches(nonsense, -1.0).no_match and all(h.match for h in nonsense.hits)
    # image queries: against the reference captions
    image = load_image(next(searcher.index.images_root.rglob("coffee.png")))
    found = searcher.mark_matches(searcher.search_image([image], k=5, candidates=50)[0])
    assert found.match_test == "reference" and found.query_is_text is False
    assert all(h.match == (h.global_score >= found.min_score) and h.relevance is not None for h in found.hits)


def test_a_model_folder_without_a_bank_keeps_its_fixed_min_score(searcher, model, tmp_path):
    folder = tmp_path / "old-model"
    shutil.copytree(model.source, folder)
    (folder / "reference.safetensors").unlink()
    (folder / "calibration.json").write_text('{"min_score": 0.22}')
    old = load_model(folder, device="cpu")
    assert old.reference is None and old.fingerprint == model.fingerprint
    old_searcher = Searcher(searcher.index, old)
    nonsense, real = (old_searcher.mark_matches(r) for r in
                      old_searcher.search_text(["zzzz qqqq", QUERIES[0]], k=5, candidates=N_IMAGES))
    assert nonsense.match_test == real.match_test == "min_score" and nonsense.min_score == real.min_score == 0.22
    assert all(h.match == (h.global_score >= 0.22) and h.relevance is None for h in real.hits + nonsense.hits)
    uncalibrated = copy.copy(model)  # as loaded from a model folder with neither
    uncalibrated.calibration, uncalibrated.reference = {}, None
    bare = Searcher(searcher.index, uncalibrated)
    unmarked = bare.mark_matches(bare.search_text(["zzzz qqqq"], k=5, candidates=N_IMAGES)[0])
    assert bare.default_min_score is None and unmarked.min_score is None and not unmarked.no_match
    assert all(h.match is None for h in unmarked.hits)


def test_float16_rerank_precision_keeps_the_ranking_within_its_tolerance(built, model, searcher):
    half = Searcher(Index(built), model, rerank_precision="float16")
    assert half.reranker.dtype == torch.float16 and searcher.reranker.dtype == torch.float32
    queries = ["a cat", "a man with a camera", "a rocket on the launch pad", "coins on a table"]
    for exact, approx in zip(searcher.search_text(queries, k=5, candidates=10),
                             half.search_text(queries, k=5, candidates=10)):
        assert exact.hits[0].id == approx.hits[0].id
        scores = {h.id: h.local_score for h in exact.hits}
        for h in approx.hits:
            if h.id in scores:
                assert h.local_score == pytest.approx(scores[h.id], abs=2e-2)  # a sum over words of 2e-3 steps
    with pytest.raises(ValueError, match="unknown rerank precision"):
        Searcher.open(built, model, rerank_precision="float8")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_float16_only_on_cpus_with_float16_arithmetic(built, model, monkeypatch, native):
    """Where the CPU computes in float16 (AVX512-FP16, AMX-FP16) ``auto`` reranks in float16; elsewhere torch
    emulates float16, slower than float32, and ``auto`` keeps float32."""
    monkeypatch.setattr(rerank, "cpu_has_float16_arithmetic", lambda: native)
    auto = Searcher(Index(built), model)
    assert auto.reranker.dtype == (torch.float16 if native else torch.float32)
    assert rerank.compute_dtype(torch.device("cuda")) == torch.float16


def test_float16_arithmetic_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    for flags, expected in (("fpu avx2 avx512f avx512_bf16 amx_bf16", False), ("fpu avx2 avx512f avx512_fp16", True)):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        rerank.cpu_has_float16_arithmetic.cache_clear()
        assert rerank.cpu_has_float16_arithmetic(str(cpuinfo)) is expected
    rerank.cpu_has_float16_arithmetic.cache_clear()
    assert rerank.cpu_has_float16_arithmetic(str(tmp_path / "absent")) is False  # not Linux: float32
    rerank.cpu_has_float16_arithmetic.cache_clear()


def test_collection_score_is_the_query_s_10th_best_global_score_whatever_candidates(searcher):
    import math

    from alignsearch.models.reference import COLLECTION_M

    every = searcher.search_text(["a cup of coffee on a table"], k=N_IMAGES, candidates=N_IMAGES)[0]
    tenth = sorted((h.global_score for h in every.hits), reverse=True)[COLLECTION_M - 1]
    for k, candidates in ((1, 1), (3, 5), (5, 50)):  # fewer candidates than M: the first stage fetches M anyway
        found = searcher.search_text(["a cup of coffee on a table"], k=k, candidates=candidates)[0]
        assert found.collection == pytest.approx(tenth, abs=1e-5) and len(found.hits) == k
    image = searcher.search_image([load_image(next(searcher.index.images_root.rglob("coffee.png")))], k=2,
                                  candidates=2)[0]
    assert image.collection is not None and math.isfinite(image.collection)
