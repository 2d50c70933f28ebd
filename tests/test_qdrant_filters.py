"""Filters on the Qdrant store: the same filter gives the same hits, ranks and scores through a Qdrant index (a
payload filter in the fused query's prefetch; point ids elsewhere) as through the FAISS index (SQLite's allowed
rows) built from the same photos and fields: selective and broad filters, every condition kind, nesting, pages,
image -> captions, a scoring Qdrant cannot fuse, fields changed after the build, and rows whose payload a failed
update left ahead of the index's version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import build_index, sample_files

pytest.importorskip("qdrant_edge", reason="the Qdrant backend needs the qdrant extra (pip install -e '.[qdrant]')")

from alignsearch.indexer import qdrant_engines, qdrant_store  # noqa: E402
from alignsearch.indexer.index import Index, verify  # noqa: E402
from alignsearch.indexer.qdrant_filters import FV, folders, payload  # noqa: E402
from alignsearch.indexer.search import Searcher  # noqa: E402
from alignsearch.indexer.update import set_fields  # noqa: E402
from alignsearch.models import load_model  # noqa: E402
from alignsearch.models.scoring import ScoringConfig  # noqa: E402

TEXTS = ["a cat with green eyes", "an astronaut in front of a flag", "a rocket on its launch pad", "a cup of coffee"]
EXACT = ("--faiss-factory", "Flat", "--local-codec", "Flat")

FILTERS = [  # (filter, how many of the 16 photos it allows)
    ({"must": [{"key": "n", "match": {"value": 5}}]}, 1),
    ({"must": [{"key": "tag", "match": {"value": "t1"}}]}, None),
    ({"must": [{"key": "tag", "match": {"any": ["t0", "t2"]}}]}, None),
    ({"must": [{"key": "n", "range": {"gte": 3, "lt": 11}}]}, 8),
    ({"must": [{"key": "day", "range": {"gt": "2024-01-05", "lte": "2024-01-12T00:00:00Z"}}]}, 7),
    ({"must": [{"key": "place", "prefix": "eu/fr"}]}, None),
    ({"must": [{"key": "place", "prefix": "/eu/"}], "must_not": [{"key": "place", "prefix": "eu/fr/paris"}]}, None),
    ({"must": [{"key": "place", "prefix": "eu/f"}]}, 0),  # not a folder boundary: nothing
    ({"must": [{"key": "place", "prefix": ""}]}, 16),  # has the field
    ({"must_not": [{"key": "place", "prefix": ""}]}, 0),
    ({"should": [{"key": "ok", "match": {"value": True}}, {"key": "n", "match": {"any": [1, 2]}}]}, None),
    ({"must": [{"should": [{"key": "folder", "prefix": "sub"}, {"key": "score", "range": {"gt": 0.5}}]},
               {"must_not": [{"key": "ok", "match": {"value": False}}]}]}, None),
    ({"must_not": [{"key": "tag", "match": {"value": "t0"}}]}, None),
    ({"must": [{"key": "source", "match": {"value": "demo"}}, {"key": "width", "range": {"gte": 100}}]}, None),
    ({"must": [{"key": "n", "match": {"any": [0, 15, 99]}}, {"key": "score", "range": {"lte": 0.9}}]}, None),
    ({}, 16),
]


def _fields(i: int, image: str) -> dict:
    cities = ["eu/fr/paris", "eu/fr/lyon", "eu/de", "us/ny", "eu/fr/paris/left"]
    return {"image": image, "n": i, "tag": [f"t{i % 3}", f"t{(i + 1) % 4}"], "day": f"2024-01-{i + 1:02d}",
            "ok": i % 3 == 0, "place": cities[i % 5], "score": round(i / 16, 3)}


@pytest.fixture(scope="module")
def model():
    return load_model(None, device="cpu")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, photos) -> tuple[Path, Path]:
    """A FAISS index and a Qdrant index of the same photos with the same fields."""
    root = tmp_path_factory.mktemp("qfilters")
    images = sorted(p.relative_to(photos[0]).as_posix() for p in sample_files(photos[0]))
    meta = root / "fields.jsonl"
    meta.write_text("".join(json.dumps(_fields(i, image)) + "\n" for i, image in enumerate(images)))
    assert build_index(*photos, root / "faiss", *EXACT, "--metadata", str(meta)) == 0
    assert build_index(*photos, root / "qdrant", "--store", "qdrant", "--qdrant-path", str(root / "store"),
                       "--metadata", str(meta)) == 0
    return root / "faiss", root / "qdrant"


def _searchers(pair, model) -> tuple[Searcher, Searcher]:
    return tuple(Searcher(Index(folder), model, rerank_precision="float32") for folder in pair)


def _id(searcher: Searcher, name: str) -> str:
    """The id of the fixture photo called ``name`` (some are in ``sub/``)."""
    return searcher.index.conn.execute("SELECT id FROM images WHERE path LIKE ?", (f"%{name}",)).fetchone()[0]


def _same(expected, got, tol: float = 1e-4) -> None:
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert [h.id for h in a.hits] == [h.id for h in b.hits]
        assert all(abs(x.score - y.score) < tol and abs(x.global_score - y.global_score) < tol
                   for x, y in zip(a.hits, b.hits))
        assert (a.total, a.has_more, a.offset) == (b.total, b.has_more, b.offset)


def test_folders_of_a_path_are_its_prefixes_on_folder_boundaries():
    assert folders("eu/fr/paris") == ["", "eu", "eu/fr", "eu/fr/paris"]
    assert folders("a//b/") == ["", "a", "a//b"]  # SQL: "a//b/" lies under a//b; "a/" is no stripped path
    assert folders("/x") == [""]
    point = payload(3, {"place": ["eu/fr"], "n": [2.0], "ok": [1]}, {"place": "string", "n": "number", "ok": "bool"}, 7)
    assert point["row"] == 3 and point[FV] == 7 and sorted(point.values(), key=str)  # plain JSON values


@pytest.mark.slow
def test_every_filter_gives_the_faiss_answer(pair, model, monkeypatch):
    reference, searcher = _searchers(pair, model)
    fused = []
    store = searcher.index.images.index
    monkeypatch.setattr(store, "_fused_filtered",
                        lambda *a, **kw: fused.append(1) or type(store)._fused_filtered(store, *a, **kw))
    enc = model.encode_texts(TEXTS)
    for filter_, count in FILTERS:
        allowed = reference.index.allowed("images", filter_).count
        assert count is None or allowed == count, (filter_, allowed)
        assert count is not None or 0 < allowed, (filter_, allowed)
        for candidates in (4, 16):  # a real first stage, and every photo
            _same(reference.search_text_encoded(enc, 5, candidates, filter=filter_),
                  searcher.search_text_encoded(enc, 5, candidates, filter=filter_))
    assert len(fused) >= sum(2 for f, c in FILTERS if c != 0)  # the payload filter ran (not the ids' way)


@pytest.mark.slow
def test_pages_of_a_filtered_search_match(pair, model):
    reference, searcher = _searchers(pair, model)
    enc = model.encode_texts(TEXTS[:2])
    broad = {"must_not": [{"key": "tag", "match": {"value": "t0"}}]}
    for offset in (0, 3, 6, 20):
        _same(reference.search_text_encoded(enc, 3, 8, filter=broad, offset=offset),
              searcher.search_text_encoded(enc, 3, 8, filter=broad, offset=offset))
    whole = searcher.search_text_encoded(enc, 9, 16, filter=broad)
    parts = [searcher.search_text_encoded(enc, 3, 16, filter=broad, offset=o) for o in (0, 3, 6)]
    for q in range(2):
        assert [h.id for p in parts for h in p[q].hits] == [h.id for h in whole[q].hits]


@pytest.mark.slow
def test_captions_similar_and_unfused_scorings_match(pair, model, photos):
    from PIL import Image

    reference, searcher = _searchers(pair, model)
    images = model.encode_images([Image.open(p).convert("RGB") for p in sample_files(photos[0])[:2]])
    texts, symm = model.encode_texts(TEXTS[:2]), ScoringConfig("Symm", 0.3)
    for filter_, _ in (FILTERS[0], FILTERS[5], FILTERS[12]):
        _same(reference.search_image_encoded(images, 5, 10, filter=filter_),
              searcher.search_image_encoded(images, 5, 10, filter=filter_))
        _same(reference.search_text_encoded(texts, 4, 8, scoring=symm, filter=filter_),
              searcher.search_text_encoded(texts, 4, 8, scoring=symm, filter=filter_))
    coffee = _id(searcher, "coffee.png")
    enc, rows = searcher.similar_queries([coffee])
    ref_enc, _ = reference.similar_queries([coffee])
    _same(reference.search_similar_encoded(ref_enc, 5, FILTERS[3][0], exclude=rows),
          searcher.search_similar_encoded(enc, 5, FILTERS[3][0], exclude=rows))


@pytest.mark.slow
def test_fields_changed_after_the_build_and_payload_left_ahead(pair, model, tmp_path):
    import shutil

    faiss_dir, qdrant_dir = pair
    copies = tmp_path / "faiss", tmp_path / "qdrant"
    shutil.copytree(faiss_dir, copies[0])
    shutil.copytree(qdrant_dir, copies[1])  # the same Qdrant collections: this test runs last on them
    reference, searcher = _searchers(copies, model)
    coffee, rocket, astronaut = (_id(searcher, n) for n in ("coffee.png", "rocket.jpg", "astronaut.png"))
    changed = {coffee: {"place": ["us/sf"], "tag": ["t9"]}, rocket: {"n": [100], "ok": [True]}}
    for folder in copies:
        assert set_fields(folder, changed)["updated"] == 2
    qdrant_engines.release()
    reference, searcher = _searchers(copies, model)
    assert searcher.index.images.index.fields_version == 1
    enc = model.encode_texts(TEXTS)
    for filter_ in ({"must": [{"key": "place", "prefix": "us"}]}, {"must": [{"key": "tag", "match": {"value": "t9"}}]},
                    {"must": [{"key": "n", "range": {"gt": 50}}]}, FILTERS[1][0], FILTERS[5][0]):
        _same(reference.search_text_encoded(enc, 5, 16, filter=filter_),
              searcher.search_text_encoded(enc, 5, 16, filter=filter_))
    assert verify(copies[1]) == []

    # a failed update wrote a photo's payload ahead of this version: SQLite's answer still decides
    col = searcher.index.images.index.collection
    row = int(searcher.index.image_by_id(astronaut)["row"])
    types = searcher.index.field_types
    col.engine.set_payload(col.name, {row: payload(row, {"place": ["mars"], "n": [7.0]}, types, 2)})
    for filter_ in ({"must": [{"key": "place", "prefix": "mars"}]}, FILTERS[0][0], FILTERS[5][0],
                    {"must": [{"key": "n", "match": {"value": 7}}]}, {"must_not": [{"key": "n", "range": {"lt": 1}}]}):
        _same(reference.search_text_encoded(enc, 5, 16, filter=filter_),
              searcher.search_text_encoded(enc, 5, 16, filter=filter_))
    # the next update rewrites the row left ahead from SQLite
    for folder in copies:
        set_fields(folder, {coffee: {"n": [42]}})
    qdrant_engines.release()
    reference, searcher = _searchers(copies, model)
    assert searcher.index.images.index.fields_version == 2
    assert len(col.engine.ids(col.name, None, qdrant_store.Clause(must=[qdrant_store.Range(FV, gt=2)]))) == 0
    for filter_ in ({"must": [{"key": "place", "prefix": "mars"}]}, FILTERS[0][0], {"must": [{"key": "n", "match": {"value": 42}}]}):
        _same(reference.search_text_encoded(enc, 5, 16, filter=filter_),
              searcher.search_text_encoded(enc, 5, 16, filter=filter_))
