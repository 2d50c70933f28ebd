"""The batched rerank gives the per-query path's scores and rankings: real FAISS codecs, stores on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from alignsearch.indexer import local_store, rerank
from alignsearch.indexer.rerank import DENSE_UNION_FACTOR, Reranker
from alignsearch.models.model import EncoderOutput
from alignsearch.models.scoring import ScoringConfig, rank

DIM, REGIONS, N = 32, 9, 300


def _normalised(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _store(folder: Path, codec: str, lengths: np.ndarray, seed: int = 0) -> local_store.LocalStore:
    vectors = _normalised(np.random.default_rng(seed), (int(lengths.sum()), DIM))
    coder = local_store.make_codec(DIM, codec, vectors)
    local_store.write_store(folder, coder, local_store.encode(coder, vectors), lengths)
    return local_store.LocalStore.open(folder)


def _queries(count: int, tokens: int, seed: int = 1) -> EncoderOutput:
    rng = np.random.default_rng(seed)
    local = torch.from_numpy(_normalised(rng, (count, tokens, DIM)))
    mask = torch.from_numpy(np.arange(tokens)[None, :] < rng.integers(1, tokens + 1, count)[:, None])
    return EncoderOutput(torch.from_numpy(_normalised(rng, (count, DIM))), local, mask)


def _per_query(enc: EncoderOutput, store, rows_per_query, query_is_text: bool, scoring: ScoringConfig):
    """Today's path, one query at a time: the store's own gather (float32) and the pairwise scorer."""
    out = []
    for q, rows in enumerate(rows_per_query):
        local, mask = store.gather(rows)
        q_local, q_mask = enc.local[q : q + 1], enc.mask[q : q + 1]
        if query_is_text:
            out.append(scoring.local(q_local, q_mask, local, mask)[0])
        else:
            out.append(scoring.local(local, mask, q_local, q_mask)[:, 0])
    return out


def _candidates(count: int, k: int, shared: bool, seed: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    pool = rng.choice(N, k + 3, replace=False) if shared else None
    lists = [rng.permutation(pool)[:k] if shared else rng.choice(N, k, replace=False) for _ in range(count)]
    lists[-1] = lists[-1][: k // 2]  # a shorter list: padding must not leak into scores
    return lists


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, local_store.LocalStore]:
    root = tmp_path_factory.mktemp("rerank")
    grid = np.full(N, REGIONS, np.int64)
    varying = np.random.default_rng(5).integers(1, 12, N)
    return {"SQfp16": _store(root / "fp16", "SQfp16", grid), "SQ8": _store(root / "sq8", "SQ8", grid),
            "captions": _store(root / "captions", "SQfp16", varying), "PQ8": _store(root / "pq8", "PQ8", grid)}


def test_pq_codes_decode_on_the_codes_device_as_faiss_does(stores):
    store = stores["PQ8"]
    assert store.decodes_on_device and not stores["SQ8"].decodes_on_device
    codes = np.array(store.codes[:50])
    np.testing.assert_array_equal(store.decode_tensor(torch.from_numpy(codes)).numpy(), store.decode(codes).numpy())
    with pytest.raises(TypeError, match="no device decoder"):
        stores["SQ8"].decode_tensor(torch.from_numpy(np.array(stores["SQ8"].codes[:2])))


@pytest.mark.parametrize("shared", [True, False], ids=["dense", "block"])
def test_decoding_on_the_device_gives_the_same_scores(stores, shared):
    """What a GPU does with PQ codes (they travel as bytes, the device decodes them), run on the CPU."""
    store, scoring = stores["PQ8"], ScoringConfig()
    enc, rows = _queries(4, 7), _candidates(4, 40, shared)
    on_host = Reranker("cpu").rerank(enc, store, rows, True, scoring)
    on_device = Reranker("cpu", decode_on_device=True).rerank(enc, store, rows, True, scoring)
    torch.testing.assert_close(on_device.scores, on_host.scores, atol=1e-6, rtol=0)
    assert on_device.gathered.nbytes == on_host.gathered.nbytes  # the codes' bytes, not the decoded floats


@pytest.mark.parametrize("alignment", ["MrSw", "MrAVGw", "MwSr", "Symm", "LSE-norm", "CHAN-logsumexp"])
@pytest.mark.parametrize("store_name", ["SQfp16", "SQ8", "captions"])
@pytest.mark.parametrize("shared", [True, False], ids=["dense", "block"])
def test_batched_float32_equals_the_per_query_path(stores, alignment, store_name, shared):
    store, scoring = stores[store_name], ScoringConfig(alignment=alignment)
    query_is_text = store_name != "captions"
    enc = _queries(6, 7 if query_is_text else REGIONS)
    rows = _candidates(6, 40, shared)
    union = len(np.unique(np.concatenate(rows)))
    assert (union <= DENSE_UNION_FACTOR * 40) == shared  # both scoring layouts are exercised
    got = Reranker("cpu", torch.float32).rerank(enc, store, rows, query_is_text, scoring)
    assert got.gathered.nbytes == int(store.lengths()[got.gathered.rows].sum()) * store.code_size
    for q, (want, r) in enumerate(zip(_per_query(enc, store, rows, query_is_text, scoring), rows)):
        mine = got.scores[q, : len(r)]
        torch.testing.assert_close(mine, want, atol=1e-5, rtol=0)
        assert np.array_equal(rank(mine, r, 10), rank(want, r, 10))
        assert torch.all(got.scores[q, len(r) :] == 0)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_is_within_its_stated_tolerance(stores, dtype, tolerance):
    """Half-precision matmul (what CUDA runs): scores within ``tolerance`` of float32 (sums of up to 7 words)."""
    store, scoring = stores["SQfp16"], ScoringConfig()
    enc, rows = _queries(4, 7), _candidates(4, 60, False)
    exact = Reranker("cpu", torch.float32).rerank(enc, store, rows, True, scoring).scores
    half = Reranker("cpu", dtype).rerank(enc, store, rows, True, scoring).scores
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, exact, atol=tolerance, rtol=0)
    assert not torch.equal(half, exact)  # the half path really ran in half


@pytest.mark.parametrize("shared", [True, False], ids=["dense", "block"])
def test_auto_on_a_float16_cpu_runs_small_batches_in_float32(stores, monkeypatch, shared):
    """``auto`` where the CPU has float16 arithmetic: text batches from HALF_FROM_QUERIES queries up score exactly
    as a float16 reranker does, smaller ones and image queries exactly as a float32 one (float16 was slower)."""
    monkeypatch.setattr(rerank, "cpu_has_float16_arithmetic", lambda: True)
    store, scoring = stores["SQfp16"], ScoringConfig()
    auto = Reranker("cpu")
    assert auto.dtype == torch.float16
    assert [auto.dtype_for(q) for q in (1, rerank.HALF_FROM_QUERIES - 1, rerank.HALF_FROM_QUERIES, 16)] == [
        torch.float32, torch.float32, torch.float16, torch.float16]
    assert Reranker("cpu", torch.float16).dtype_for(1) == torch.float16  # an explicit precision holds for any batch
    assert auto.dtype_for(16, query_is_text=False) == torch.float32  # image queries: captions are too short
    for count, dtype in ((1, torch.float32), (rerank.HALF_FROM_QUERIES, torch.float16), (8, torch.float16)):
        enc, rows = _queries(count, 7), _candidates(count, 40, shared)
        want = Reranker("cpu", dtype).rerank(enc, store, rows, True, scoring).scores
        assert torch.equal(auto.rerank(enc, store, rows, True, scoring).scores, want), (count, dtype)
    images, rows = _queries(8, REGIONS), _candidates(8, 40, shared)
    want = Reranker("cpu", torch.float32).rerank(images, stores["captions"], rows, False, scoring).scores
    assert torch.equal(auto.rerank(images, stores["captions"], rows, False, scoring).scores, want)


@pytest.mark.parametrize("query_is_text", [True, False], ids=["text-query", "image-query"])
def test_score_gathered_is_the_scoring_step_of_rerank(stores, query_is_text):
    """The public scoring step (what the suite times alone on a GPU): every query against every gathered item."""
    store, scoring = stores["SQfp16"], ScoringConfig()
    enc, rows = _queries(3, 7 if query_is_text else REGIONS), _candidates(3, 30, True)
    reranker = Reranker("cpu", torch.float32)
    got = reranker.rerank(enc, store, rows, query_is_text, scoring)
    queries, q_mask = reranker.queries_on_device(enc)
    dense = reranker.score_gathered(queries, q_mask, got.gathered, query_is_text, scoring)
    assert dense.shape == (3, len(got.gathered.rows))
    for q, r in enumerate(rows):
        at = np.searchsorted(got.gathered.rows, r)
        torch.testing.assert_close(dense[q, at], got.scores[q, : len(r)], atol=1e-6, rtol=0)


def test_candidates_returns_the_gathered_vectors_in_the_order_asked(stores):
    store = stores["SQfp16"]
    enc, rows = _queries(3, 5), _candidates(3, 20, False)
    got = Reranker("cpu").rerank(enc, store, rows, True, ScoringConfig())
    order = np.array([3, 0, 7])
    tokens, mask = got.candidates(1, order)
    want, want_mask = store.gather(rows[1][order])
    assert torch.equal(tokens, want) and torch.equal(mask, want_mask)


def test_queries_without_candidates(stores):
    store = stores["SQfp16"]
    enc = _queries(2, 5)
    got = Reranker("cpu").rerank(enc, store, [np.zeros(0, np.int64), np.array([4, 9])], True, ScoringConfig())
    assert got.scores.shape == (2, 2) and torch.all(got.scores[0] == 0) and torch.all(got.scores[1] != 0)
    empty = Reranker("cpu").rerank(enc, store, [np.zeros(0, np.int64)] * 2, True, ScoringConfig())
    assert empty.scores.shape == (2, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_gives_the_cpu_ranking(stores):
    store, scoring = stores["SQfp16"], ScoringConfig()
    enc, rows = _queries(4, 7), _candidates(4, 60, False)
    cpu = Reranker("cpu").rerank(enc, store, rows, True, scoring).scores
    gpu = Reranker("cuda").rerank(enc, store, rows, True, scoring).scores
    torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=0)
    for q, r in enumerate(rows):
        assert np.array_equal(rank(gpu[q, : len(r)], r, 5), rank(cpu[q, : len(r)], r, 5))


@pytest.mark.parametrize("store_name", ["SQfp16", "captions"])
def test_block_batches_cut_into_chunks_give_the_same_scores(stores, store_name, monkeypatch):
    store, scoring = stores[store_name], ScoringConfig()
    query_is_text = store_name != "captions"
    enc, rows = _queries(5, 7 if query_is_text else REGIONS), _candidates(5, 30, False)
    whole = Reranker("cpu").rerank(enc, store, rows, query_is_text, scoring)
    monkeypatch.setattr(rerank, "BLOCK_BUDGET_BYTES", 1)  # one query per chunk
    chunked = Reranker("cpu").rerank(enc, store, rows, query_is_text, scoring)
    torch.testing.assert_close(chunked.scores, whole.scores, atol=1e-6, rtol=0)
    tokens, mask = chunked.candidates(4, np.array([1, 0]))
    want, want_mask = store.gather(rows[4][[1, 0]])
    assert torch.equal(tokens[:, : want.shape[1]], want) and torch.equal(mask[:, : want.shape[1]], want_mask)
    assert not mask[:, want.shape[1] :].any()  # padding of the joined chunks stays masked


def test_reused_buffers_give_the_same_scores_across_calls_and_threads(stores):
    """The reranker's buffers are reused per thread: growing batches, and two threads at once, score right."""
    from concurrent.futures import ThreadPoolExecutor

    store, scoring = stores["SQfp16"], ScoringConfig()
    batches = [(_queries(q, 6, seed=q), _candidates(q, 40, shared, seed=q)) for q in (2, 7, 3) for shared in (True, False)]
    want = [Reranker("cpu").rerank(enc, store, rows, True, scoring).scores for enc, rows in batches]
    shared_reranker = Reranker("cpu")

    def run(order: list[int]) -> list[tuple[int, torch.Tensor]]:
        return [(i, shared_reranker.rerank(*batches[i][:1], store, batches[i][1], True, scoring).scores) for i in order]

    with ThreadPoolExecutor(2) as pool:
        results = [r for f in [pool.submit(run, list(range(len(batches))) * 8),
                               pool.submit(run, list(reversed(range(len(batches)))) * 8)] for r in f.result()]
    for i, scores in results:
        assert torch.equal(scores, want[i])
