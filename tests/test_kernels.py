"""The rerank kernel chosen by measuring: every kernel ranks as the float32 reference does, the choice is the
fastest one measured, and small stores keep the default. Real FAISS codecs, stores on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from alignsearch.indexer import kernels, local_store
from alignsearch.indexer.rerank import Reranker
from alignsearch.models.model import EncoderOutput
from alignsearch.models.scoring import ScoringConfig, rank

DIM, REGIONS = 32, 9
N = kernels.SAMPLE_QUERIES * kernels.SAMPLE_CANDIDATES  # the smallest store that is measured


def _normalised(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _store(folder: Path, n: int, codec: str = "SQfp16") -> local_store.LocalStore:
    vectors = _normalised(np.random.default_rng(0), (n * REGIONS, DIM))
    coder = local_store.make_codec(DIM, codec, vectors)
    local_store.write_store(folder, coder, local_store.encode(coder, vectors), np.full(n, REGIONS, np.int64))
    return local_store.LocalStore.open(folder)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> local_store.LocalStore:
    return _store(tmp_path_factory.mktemp("kernels") / "images", N)


def _queries(count: int, tokens: int = 7, seed: int = 1) -> EncoderOutput:
    rng = np.random.default_rng(seed)
    local = torch.from_numpy(_normalised(rng, (count, tokens, DIM)))
    mask = torch.from_numpy(np.arange(tokens)[None, :] < rng.integers(2, tokens + 1, count)[:, None])
    return EncoderOutput(torch.from_numpy(_normalised(rng, (count, DIM))), local, mask)


@pytest.mark.parametrize("shared", [True, False], ids=["dense", "block"])
@pytest.mark.parametrize("kernel", sorted(kernels.candidates(torch.device("cpu"), "auto")))
def test_every_kernel_ranks_as_the_float32_reference(store, kernel, shared, monkeypatch):
    """Each kernel the chooser may pick gives the reference's scores within its dtype's tolerance and the same
    top 10, for a batch whose queries share their candidates (dense) and one whose do not (block)."""
    monkeypatch.setattr(kernels, "CHUNK_ITEMS", 20)  # several chunks even at this size, one cut inside a query
    dtype, chunk = kernels.candidates(torch.device("cpu"), "auto")[kernel]
    rng = np.random.default_rng(3)
    pool = rng.choice(N, 60, replace=False)
    rows = [rng.permutation(pool)[:50] if shared else rng.choice(N, 50, replace=False) for _ in range(6)]
    rows[-1] = rows[-1][:23]  # a shorter list: padding must not leak
    enc, scoring = _queries(6), ScoringConfig()
    want = Reranker("cpu", torch.float32).rerank(enc, store, rows, True, scoring).scores
    got = kernels.reranker_for(torch.device("cpu"), dtype, chunk and 20, "auto").rerank(enc, store, rows, True, scoring)
    per_word = {torch.float16: 2e-3, torch.bfloat16: 3e-3}  # the tolerances docs/benchmarks.md states
    tolerance = 1e-5 if dtype == torch.float32 else per_word[dtype] * enc.mask.sum(1).max().item()
    torch.testing.assert_close(got.scores, want, atol=tolerance, rtol=0)
    tokens, mask = got.candidates(2, np.array([4, 0]))  # what an explained hit reads, however it was scored
    want_tokens, want_mask = store.gather(rows[2][[4, 0]])
    assert torch.equal(tokens, want_tokens) and torch.equal(mask, want_mask)
    for q, r in enumerate(rows):
        top_want, top_got = r[rank(want[q, : len(r)], r, 10)], r[rank(got.scores[q, : len(r)], r, 10)]
        if dtype == torch.float32:
            assert np.array_equal(top_got, top_want)
        else:  # half precision: the same set, where neighbours are further apart than the tolerance
            gaps = np.diff(np.sort(want[q, : len(r)].numpy())[::-1][:11])
            if np.all(np.abs(gaps) > 2 * tolerance):
                assert np.array_equal(top_got, top_want)


def test_the_chosen_kernel_is_the_fastest_measured_and_kept(store, monkeypatch):
    measured = []

    def fake_measure(store_, device, kernels_, precision, scoring=None, repeats=kernels.REPEATS):
        measured.append(sorted(kernels_))
        return {name: (1.0 if name == "float32-chunked" else 5.0) for name in kernels_}

    monkeypatch.setattr(kernels, "measure", fake_measure)
    monkeypatch.setattr(kernels, "_chosen", {})
    reranker, choice = kernels.choose(store, "cpu", "auto")
    assert choice.kernel == "float32-chunked" and reranker.kernel == "float32-chunked"
    assert reranker.chunk_items == kernels.CHUNK_ITEMS and reranker.dtype == torch.float32
    assert choice.timings_ms["float16"] == 5.0
    kernels.choose(store, "cpu", "auto")
    assert len(measured) == 1  # once per process for this store's shape
    _, half_only = kernels.choose(store, "cpu", "float16")
    assert half_only.kernel == "float16" and len(measured) == 1  # one candidate: nothing to measure
    _, exact = kernels.choose(store, "cpu", "float32")
    assert measured[-1] == ["float32", "float32-chunked"] and exact.kernel == "float32-chunked"


def test_a_real_measurement_times_every_candidate(store):
    timings = kernels.measure(store, torch.device("cpu"), kernels.candidates(torch.device("cpu"), "auto"), repeats=1)
    assert set(timings) == {"float32", "float32-chunked", "float16", "bfloat16-chunked"}
    assert all(t > 0 for t in timings.values())


def test_small_stores_keep_the_default_without_measuring(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "measure", lambda *a, **k: pytest.fail("measured a small store"))
    small = _store(tmp_path / "small", N - 1)
    reranker, choice = kernels.choose(small, "cpu", "auto")
    assert choice.timings_ms == {} and reranker.kernel == kernels.kernel_name(Reranker("cpu").dtype)
    assert reranker.small_batch_dtype == torch.float32 and reranker.chunk_items == 0
