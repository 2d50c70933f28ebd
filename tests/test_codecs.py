"""The local codecs' presets (issue 13): one factory string per collection, the ``compact`` preset's size per
photo, its round-trip error against SQfp16, and an index built with it that searches and verifies."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from alignsearch.indexer import local_store, stores
from alignsearch.indexer.index import Index, verify
from alignsearch.indexer.search import Searcher
from alignsearch.models import load_model

from conftest import N_IMAGES, build_index as _build, default_regions

COMPACT_MAX_BYTES_PER_PHOTO = 4096  # issue 13's target for the region codes of one photo


@pytest.fixture(scope="module")
def model():
    return load_model(device="cpu")


@pytest.fixture(scope="module")
def compact(tmp_path_factory, photos) -> Index:
    out = tmp_path_factory.mktemp("compact") / "index"
    assert _build(*photos, out, "--local-codec", "compact") == 0
    return Index(out)


def test_a_preset_names_one_codec_per_collection_and_a_factory_string_both():
    assert local_store.collection_spec("compact", "images") == "PQ64"
    assert local_store.collection_spec("compact", "captions") == "SQfp16"
    # sized to the photo's regions: 7 x 7 cells keep PQ64 (3.1 kB), 9 x 9 get PQ48 (3.9 kB), both under 4 kB
    assert local_store.collection_spec("compact", "images", regions=49) == "PQ64"
    assert local_store.collection_spec("compact", "images", regions=81) == "PQ48"
    assert local_store.collection_spec("compact", "captions", regions=81) == "SQfp16"
    assert local_store.collection_spec("PQ16", "images", regions=81) == "PQ16"
    assert {local_store.collection_spec("OPQ8,PQ8", c) for c in ("images", "captions")} == {"OPQ8,PQ8"}
    backend = stores.local_backend()
    backend.validate("compact", 384)
    with pytest.raises(ValueError, match="invalid local codec factory string 'compakt'"):
        backend.validate("compakt", 384)


def test_an_unknown_codec_is_a_one_line_refusal_before_anything_is_written(photos, tmp_path, capsys):
    assert _build(*photos, tmp_path / "x", "--local-codec", "PQ7") == 2  # 384 is not a multiple of 7
    err = capsys.readouterr().err.strip()
    assert "invalid local codec factory string 'PQ7'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_compact_region_codes_fit_the_budget_and_captions_keep_sqfp16(compact, built):
    info, reference = compact.info(), Index(built).info()
    assert info["local_codec"] == "compact"
    regions = default_regions()
    m = int(local_store.compact_pq(regions, 384)[2:])  # PQ64 for 7 x 7 cells, PQ48 for 9 x 9
    assert (info["images"]["local_codec"], info["captions"]["local_codec"]) == (f"PQ{m}", "SQfp16")
    assert compact.images.store.code_size == m and compact.captions.store.code_size == 2 * 384
    per_photo = info["images"]["bytes_per_item"]["local"]
    assert per_photo == pytest.approx(regions * m + 8, abs=1) and per_photo <= COMPACT_MAX_BYTES_PER_PHOTO
    assert per_photo < reference["images"]["bytes_per_item"]["local"] / 11  # SQfp16: 768 bytes per region
    assert info["captions"]["bytes_per_item"] == reference["captions"]["bytes_per_item"]
    assert verify(compact.folder) == []


@pytest.mark.slow
def test_compact_round_trip_is_close_to_sqfp16(compact, built):
    rows = np.arange(N_IMAGES)
    exact, exact_mask = Index(built).images.store.gather(rows)
    coded, mask = compact.images.store.gather(rows)
    assert coded.shape == exact.shape and bool((mask == exact_mask).all())
    error = float(((coded - exact) ** 2).sum() / (exact ** 2).sum())
    # 9.4% on the Flickr8k validation photos with the codec trained on other photos; these 16 photos train
    # their own codec, so less; zero would mean nothing was compressed
    assert 0.0 < error < 0.10
    cosine = (coded * exact).sum(-1) / (coded.norm(dim=-1) * exact.norm(dim=-1))
    assert float(cosine.min()) > 0.8
    captions = np.arange(len(compact.captions.store))
    np.testing.assert_array_equal(compact.captions.store.gather(captions)[0].numpy(),
                                  Index(built).captions.store.gather(captions)[0].numpy())


@pytest.mark.slow
def test_compact_index_searches_like_the_sqfp16_one(compact, built, model):
    texts = [r["text"] for r in compact.conn.execute(
        "SELECT text FROM captions WHERE image_id IS NOT NULL ORDER BY row LIMIT 12")]
    got = Searcher(compact, model).search_text(texts, k=N_IMAGES, candidates=N_IMAGES)
    expected = Searcher(Index(built), model).search_text(texts, k=N_IMAGES, candidates=N_IMAGES)
    same_first = sum(g.hits[0].id == e.hits[0].id for g, e in zip(got, expected))
    assert same_first >= len(texts) - 2, same_first
    for g, e in zip(got, expected):  # the global part is untouched; the local part keeps its order of candidates
        by_id = {h.id: h for h in e.hits}
        assert all(h.global_score == pytest.approx(by_id[h.id].global_score, abs=1e-6) for h in g.hits)
        local = np.array([[h.local_score, by_id[h.id].local_score] for h in g.hits])
        assert np.corrcoef(local.T)[0, 1] > 0.9


@pytest.mark.slow
def test_the_suite_times_gather_and_decode_per_codec():
    from alignsearch.bench.suite import decode_speed

    for codec in ("SQfp16", "compact"):
        speed = decode_speed(codec, 384, candidates=4, photos=12, repeats=3)
        assert speed["gather_ms"] > 0 and speed["decode_mvectors_per_s"] > 0


def test_pq_codes_by_matrix_products_and_by_search_equal_faiss_codes():
    """What a GPU computes when it writes PQ codes (run here on the CPU), and what the CPU computes (a flat
    search per sub-quantizer): FAISS's per-vector codes, but for float ties."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 48)).astype(np.float32)
    codec = local_store.make_codec(48, "PQ8", vectors[:2000])
    by_faiss = codec.sa_encode(vectors)
    by_products = local_store.pq_encode(codec.pq, vectors, torch.device("cpu"), chunk=1000)  # chunks joined in order
    assert by_products.dtype == np.uint8 and by_products.shape == by_faiss.shape == (3000, 8)
    assert (by_products == by_faiss).mean() > 0.999
    assert np.array_equal(local_store.encode(codec, vectors, device="cpu"), by_products)
    by_search = local_store.encode(codec, vectors)  # no GPU here: the flat-search path
    assert by_search.dtype == np.uint8 and by_search.shape == (3000, 8)
    assert (by_search == by_faiss).mean() > 0.999 and not np.array_equal(by_search, np.zeros_like(by_search))
    assert np.array_equal(local_store.pq_encode_by_search(codec.pq, vectors[:10]), by_search[:10])
    assert faiss.downcast_index(codec).pq.assign_index is None  # the shared codec is left as it was
    sq = local_store.make_codec(48, "SQ8", vectors[:2000])  # not PQ: FAISS's encoder wherever asked
    assert np.array_equal(local_store.encode(sq, vectors, device="cpu"), sq.sa_encode(vectors))
