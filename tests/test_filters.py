"""Filtered search and pages: a filtered search returns the top-k of the two-stage ranking of the filtered
subset alone (checked against a brute-force reference: every allowed row's global score, its top candidates
reranked with the same scoring) at selectivities from 0.1% to 100%, through each coarse way (exact, ID
selector, widened top); the filter language's errors; pages are ranks of the same ranking."""

from __future__ import annotations

import numpy as np
import pytest

from alignsearch.bench.synthetic import _normalised, _shard
from alignsearch.indexer import faiss_index, search as search_module
from alignsearch.indexer.assemble import assemble_index
from alignsearch.indexer.filters import FilterError
from alignsearch.indexer.index import Index
from alignsearch.indexer.photo_fields import format_date
from alignsearch.indexer.search import Searcher
from alignsearch.indexer.writer import read_shards, write_shard
from alignsearch.models import load_model
from alignsearch.models.scoring import rank

N = 20_000
DAY0 = 1_600_000_000.0
QUERIES = ["a dog runs through the grass", "children playing in the snow", "a red car"]


@pytest.fixture(scope="module")
def model():
    return load_model(device="cpu")


def _fields(i: int) -> dict:
    return {"group": [i % 1000], "bucket": [i % 20], "folder": [f"f{i % 5}/s{i % 2}"], "half": [i % 2 == 0],
            "day": [format_date(DAY0 + 3600.0 * i)], "tags": [f"t{i % 7}", f"t{(i + 1) % 7}"], "name": [f"n{i}"]}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, model):
    """N images of random vectors (4 regions each) with fields, in a Flat index; and the global vectors."""
    root = tmp_path_factory.mktemp("filtered")
    rng = np.random.default_rng(1)
    dim = model.embed_dim
    local = _normalised(rng, (N, 4, dim))
    items = [{"id": f"img{i:05d}", "path": f"img{i:05d}.jpg", "width": 10, "height": 10} for i in range(N)]
    shard = _shard(local, items)
    write_shard(root / "work", "images", 0, shard)
    write_shard(root / "work", "captions", 0, _shard(_normalised(rng, (1, 3, dim)),
                                                     [{"id": "c", "text": "x", "image_id": None, "extra": {}}]))
    folder = root / "index"
    folder.mkdir()
    assemble_index(folder, model, {n: read_shards(root / "work", n) for n in ("images", "captions")}, folder,
                   "SQfp16", global_spec="Flat", fields={it["id"]: _fields(i) for i, it in enumerate(items)})
    return folder, np.asarray(shard.global_vectors, np.float32)


@pytest.fixture(scope="module")
def searcher(synthetic, model):
    return Searcher(Index(synthetic[0]), model, rerank_precision="float32")


def _reference(searcher, enc, allowed_rows: np.ndarray, vectors: np.ndarray, k: int, candidates: int, offset=0):
    """Brute force: every allowed row's global score, the top ``candidates`` reranked with the same scoring."""
    out = []
    g_all = enc.global_emb.numpy() @ vectors[allowed_rows].T
    for q in range(len(g_all)):
        order = np.lexsort((allowed_rows, -g_all[q]))[:candidates]
        rows = allowed_rows[order]
        sub = enc.select([q])
        reranked = searcher.rerank(sub, searcher.index.images, [rows], True)
        fused = searcher.scoring.fuse(torch_tensor(g_all[q][order][None, :]), reranked.scores)[0]
        top = rank(fused, rows, offset + k)[offset:]
        out.append(([f"img{r:05d}" for r in rows[top]], fused.numpy()[top]))
    return out


def torch_tensor(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _rows(predicate) -> np.ndarray:
    return np.array([i for i in range(N) if predicate(i)], dtype=np.int64)


CASES = [  # (filter, which rows it allows): 0.1% ... 100%
    ({"must": [{"key": "group", "match": {"value": 7}}]}, lambda i: i % 1000 == 7),
    ({"must": [{"key": "bucket", "match": {"any": [3, 4]}}]}, lambda i: i % 20 in (3, 4)),
    ({"must": [{"key": "folder", "prefix": "f1"}]}, lambda i: i % 5 == 1),
    ({"must": [{"key": "folder", "prefix": "f2/s0"}], "must_not": [{"key": "bucket", "match": {"value": 2}}]},
     lambda i: i % 5 == 2 and i % 2 == 0 and i % 20 != 2),
    ({"should": [{"key": "half", "match": {"value": True}}, {"key": "group", "match": {"value": 1}}]},
     lambda i: i % 2 == 0 or i % 1000 == 1),
    ({"must": [{"key": "day", "range": {"gte": "2020-09-13T12:26:40Z", "lt": DAY0 + 3600.0 * 15000}}]},
     lambda i: 0 <= i < 15000),
    ({"must_not": [{"key": "tags", "match": {"value": "t3"}}]}, lambda i: 3 not in (i % 7, (i + 1) % 7)),
    ({}, lambda i: True),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_filtered_search_is_the_two_stage_ranking_of_the_subset(searcher, synthetic, model, case):
    filter_, predicate = CASES[case]
    allowed = _rows(predicate)
    assert np.array_equal(searcher.index.allowed("images", filter_).rows, allowed)
    enc = model.encode_texts(QUERIES)
    k, candidates = 10, 50
    got = searcher.search_text_encoded(enc, k, candidates, filter=filter_)
    for result, (ids, scores) in zip(got, _reference(searcher, enc, allowed, synthetic[1], k, candidates)):
        assert [h.id for h in result.hits] == ids
        assert np.allclose([h.score for h in result.hits], scores, atol=1e-4)
        assert result.total == len(allowed) and result.has_more == (len(allowed) > k)


@pytest.mark.parametrize("way", ["exact", "selector", "widened"])
def test_each_coarse_way_gives_the_same_exact_top(searcher, synthetic, model, monkeypatch, way):
    """The same filter (5% of the collection) through each way of the coarse stage: the same exact top."""
    filter_, predicate = CASES[1]
    allowed = _rows(predicate)
    monkeypatch.setattr(search_module, "EXACT_MAX", N if way == "exact" else 0)
    monkeypatch.setattr(search_module, "SELECTOR_MAX_FRACTION", 1.0 if way == "selector" else 0.0)
    calls = []
    col = searcher.index.images
    monkeypatch.setattr(col.index, "search_ids", lambda *a: calls.append(1) or type(col.index).search_ids(col.index, *a),
                        raising=False)
    enc = model.encode_texts(QUERIES)
    rows, _ = searcher.coarse_filtered(enc.global_emb.numpy(), col, 100, searcher.index.allowed("images", filter_))
    g = enc.global_emb.numpy() @ synthetic[1][allowed].T
    for q, r in enumerate(rows):
        assert np.array_equal(r, allowed[np.lexsort((allowed, -g[q]))[:100]])
    assert bool(calls) == (way == "selector")


@pytest.mark.parametrize("factory", ["HNSW16,Flat", "IVF32,Flat", "Flat"])
def test_the_id_selector_returns_only_allowed_ids_on_each_index_type(factory):
    rng = np.random.default_rng(0)
    x = _normalised(rng, (4000, 32))
    store = faiss_index.FaissGlobalStore(faiss_index.new_index(32, factory, x), factory)
    store.add(x, np.arange(4000))
    # IVF probing every list is exact (its approximation is the unfiltered search's, not the selector's)
    faiss_index.set_search_params(store.cpu_index, {"IVF32,Flat": "nprobe=32", "HNSW16,Flat": "efSearch=64"}.get(factory, ""))
    ids = np.sort(rng.choice(4000, 200, replace=False))
    q = _normalised(rng, (5, 32))
    scores, found = store.search_ids(q, 20, ids)
    exact = [ids[np.argsort(-(q[i] @ x[ids].T))[:20]] for i in range(5)]
    assert np.isin(found, ids).all()  # never an id outside the selection, never short
    recall = np.mean([len(set(f) & set(e)) / 20 for f, e in zip(found, exact)])
    assert recall >= (0.8 if factory.startswith("HNSW") else 1.0), recall


def test_pages_are_ranks_of_the_same_ranking(searcher, model):
    enc = model.encode_texts(QUERIES[:2])
    for filter_ in (None, CASES[2][0]):
        whole = searcher.search_text_encoded(enc, 30, 60, filter=filter_)
        for page in range(3):
            part = searcher.search_text_encoded(enc, 10, 60, filter=filter_, offset=10 * page)
            for w, p in zip(whole, part):
                assert [h.id for h in p.hits] == [h.id for h in w.hits[10 * page: 10 * page + 10]]
                assert p.offset == 10 * page and p.has_more
    tiny = {"must": [{"key": "name", "match": {"any": ["n1", "n2", "n3"]}}]}
    first = searcher.search_text_encoded(enc, 2, 10, filter=tiny)[0]
    rest = searcher.search_text_encoded(enc, 2, 10, filter=tiny, offset=2)[0]
    assert first.has_more and len(rest.hits) == 1 and not rest.has_more and rest.total == 3
    assert {h.id for h in first.hits + rest.hits} == {"img00001", "img00002", "img00003"}
    beyond = searcher.search_text_encoded(enc, 5, 10, filter=tiny, offset=10)[0]
    assert beyond.hits == [] and not beyond.has_more


def test_offset_beyond_the_candidates_widens_them(searcher, model):
    enc = model.encode_texts(QUERIES[:1])
    deep = searcher.search_text_encoded(enc, 5, 10, offset=20)[0]
    whole = searcher.search_text_encoded(enc, 25, 25)[0]
    assert [h.id for h in deep.hits] == [h.id for h in whole.hits[20:]]


BAD = [
    ({"must": [{"key": "colour", "match": {"value": "red"}}]}, "filter.must[0].key", "unknown field"),
    ({"must": [{"key": "group", "match": {"value": "seven"}}]}, "filter.must[0].match.value", "'group' is a number"),
    ({"must": [{"key": "folder", "range": {"gt": 1}}]}, "filter.must[0].range", "applies to number and date"),
    ({"must": [{"key": "day", "range": {"gt": "last week"}}]}, "filter.must[0].range.gt", "'day' is a date"),
    ({"must": [{"key": "group", "prefix": "a"}]}, "filter.must[0].prefix", "applies to text"),
    ({"must": [{"key": "group"}]}, "filter.must[0]", "exactly one of"),
    ({"must": "group"}, "filter.must", "list of conditions"),
    ({"filter": []}, "filter", "only must, should and must_not"),
    ([1], "filter", "is an object"),
    ({"should": [{"key": "half", "match": {"any": []}}]}, "filter.should[0].match.any", "1 to"),
    ({"must": [{"key": "bucket", "range": {"between": 1}}]}, "filter.must[0].range", "gt, gte, lt"),
    ({"must": [{"key": "bucket", "match": {"value": float("nan")}}]}, "filter.must[0].match.value", "a number"),
]


@pytest.mark.parametrize("bad", range(len(BAD)))
def test_bad_filters_say_where_and_why(searcher, model, bad):
    filter_, loc, message = BAD[bad]
    with pytest.raises(FilterError) as info:
        searcher.search_text_encoded(model.encode_texts(["x"]), 3, 10, filter=filter_)
    assert info.value.loc == loc and message in info.value.message


def test_nested_filters_and_caption_search(searcher, model):
    nested = {"must": [{"should": [{"key": "group", "match": {"value": 5}}, {"key": "group", "match": {"value": 6}}]},
                       {"must_not": [{"key": "half", "match": {"value": True}}]}]}
    assert np.array_equal(searcher.index.allowed("images", nested).rows, _rows(lambda i: i % 1000 == 5))
    # the one caption is standalone: a filter leaves it out, no filter finds it
    enc = model.encode_texts(["x"])
    assert searcher.search_image_encoded(enc, 1, 1, filter={})[0].hits == []
    assert len(searcher.search_image_encoded(enc, 1, 1)[0].hits) == 1
