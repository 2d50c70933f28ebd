"""The Qdrant store backend against the embedded engine (Qdrant's core in process, ``qdrant-edge-py``) and the
client's own local mode (the code path of a server): the same top-10 and scores as the FAISS backend (Flat
global store, lossless ``Flat`` local codec) both ways, add / delete, a real server, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import build_index, sample_files
from alignsearch.cli import main

pytest.importorskip("qdrant_edge", reason="the Qdrant backend needs the qdrant extra (pip install -e '.[qdrant]')")
pytest.importorskip("qdrant_client", reason="the Qdrant backend needs the qdrant extra (pip install -e '.[qdrant]')")

from alignsearch.indexer import qdrant_engines, qdrant_store  # noqa: E402
from alignsearch.indexer.build import BuildOptions, build  # noqa: E402
from alignsearch.indexer.index import Index, verify  # noqa: E402
from alignsearch.indexer.search import Searcher  # noqa: E402
from alignsearch.indexer.update import add, delete  # noqa: E402
from alignsearch.models import load_model  # noqa: E402
from alignsearch.models.scoring import ScoringConfig  # noqa: E402

TEXTS = ["a cat with green eyes", "an astronaut in front of a flag", "a rocket on its launch pad",
         "a cup of coffee", "a man riding a horse", "red motorbike parked outside"]
EXACT = ("--faiss-factory", "Flat", "--local-codec", "Flat")  # FAISS without loss: the reference


def float32_searcher(folder: Path, model) -> Searcher:
    """A searcher that reranks in float32, as Qdrant's MAX_SIM does (``auto`` is float16 on some CPUs)."""
    return Searcher(Index(folder), model, rerank_precision="float32")



@pytest.fixture(scope="module")
def model():
    return load_model(None, device="cpu")


@pytest.fixture(scope="module")
def faiss_index(tmp_path_factory, photos) -> Path:
    out = tmp_path_factory.mktemp("faiss") / "index"
    assert build_index(*photos, out, *EXACT) == 0
    return out


@pytest.fixture(scope="module")
def qdrant_index(tmp_path_factory, photos) -> Path:
    root = tmp_path_factory.mktemp("qdrant")
    assert build_index(*photos, root / "index", "--store", "qdrant", "--qdrant-path", str(root / "qdrant")) == 0
    return root / "index"


def assert_same(expected, got, tol: float = 1e-4) -> None:
    """The same hits in the same order, each part of the score within ``tol``, and the same groundings."""
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert [h.id for h in a.hits] == [h.id for h in b.hits]
        for x, y in zip(a.hits, b.hits):
            assert abs(x.score - y.score) < tol
            assert abs(x.global_score - y.global_score) < tol and abs(x.local_score - y.local_score) < tol
            if x.grounding is not None:
                assert [(g["word"], g["region"]) for g in x.grounding] == [(g["word"], g["region"]) for g in y.grounding]


def photo_queries(photos) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sample_files(photos[0])[:6]]


@pytest.mark.slow
def test_both_directions_match_faiss(faiss_index, qdrant_index, photos, model):
    reference, searcher = float32_searcher(faiss_index, model), float32_searcher(qdrant_index, model)
    assert searcher.index.images.index.backend == "qdrant"
    for candidates in (5, 100):  # a real first stage, and every item
        assert_same(reference.search_text(TEXTS, k=10, candidates=candidates, explain=True),
                    searcher.search_text(TEXTS, k=10, candidates=candidates, explain=True))
        assert_same(reference.search_image(photo_queries(photos), k=10, candidates=candidates),
                    searcher.search_image(photo_queries(photos), k=10, candidates=candidates))


@pytest.mark.slow
@pytest.mark.parametrize("scoring", [ScoringConfig("MrAVGw", 0.5), ScoringConfig("Symm", 0.3),
                                     ScoringConfig("MrSw", 0.0)], ids=["MrAVGw-in-qdrant", "Symm-ours", "w0-ours"])
def test_other_alignments_are_mapped_or_scored_by_ours(faiss_index, qdrant_index, model, scoring):
    searcher = float32_searcher(qdrant_index, model)
    inside = searcher._search_in_store(model.encode_texts(TEXTS[:2]), searcher.index.images, 5, 10, False, scoring)
    assert (inside is not None) == (scoring.alignment == "MrAVGw")  # only multiples of MrSw run inside Qdrant
    assert_same(float32_searcher(faiss_index, model).search_text(TEXTS, k=5, candidates=10, scoring=scoring),
                searcher.search_text(TEXTS, k=5, candidates=10, scoring=scoring))


@pytest.mark.slow
def test_manifest_records_backend_and_connection_and_verify_passes(qdrant_index, monkeypatch):
    manifest = json.loads((qdrant_index / "manifest.json").read_text())
    entries = [manifest["collections"][name] for name in ("images", "captions")]
    assert [e["backend"] for e in entries] == [e["local_backend"] for e in entries] == ["qdrant", "qdrant"]
    names = {e["qdrant"]["collection"] for e in entries}
    assert len(names) == 2  # one collection per side
    assert all(Path(e["qdrant"]["path"]).is_absolute() and "url" not in e["qdrant"] for e in entries)
    assert manifest["local_codec"] == "none"
    assert verify(qdrant_index) == []
    info = Index(qdrant_index).info()
    assert info["images"]["backend"] == "qdrant" and info["images"]["local_vectors"] > 0


@pytest.mark.slow
def test_client_code_path_matches_faiss(faiss_index, photos, model, tmp_path):
    """qdrant-client's local mode runs the same requests a server gets (prefetch, MAX_SIM, formula)."""
    settings = qdrant_store.QdrantSettings(url=":memory:")
    out = tmp_path / "index"
    build(model, BuildOptions(images=photos[0], captions=photos[1], out=out, progress=False, local_codec="none",
                              faiss_factory="qdrant", backend=qdrant_store.QdrantGlobalBackend(settings),
                              local_backend=qdrant_store.QdrantLocalBackend(settings)))
    entry = json.loads((out / "manifest.json").read_text())["collections"]["images"]["qdrant"]
    assert entry["url"] == ":memory:" and entry["api_key_env"] == "QDRANT_API_KEY"
    reference, searcher = float32_searcher(faiss_index, model), float32_searcher(out, model)
    assert_same(reference.search_text(TEXTS, k=10, candidates=8, explain=True),
                searcher.search_text(TEXTS, k=10, candidates=8, explain=True))
    assert_same(reference.search_image(photo_queries(photos)[:3], k=10, candidates=8),
                searcher.search_image(photo_queries(photos)[:3], k=10, candidates=8))
    assert verify(out) == []


@pytest.mark.slow
def test_add_then_delete_go_to_qdrant(faiss_index, photos, model, tmp_path):
    images, captions = photos
    files = sorted(p.relative_to(images).as_posix() for p in sample_files(images))
    settings = qdrant_store.QdrantSettings(path=str(tmp_path / "qdrant"))
    out = tmp_path / "index"
    build(model, BuildOptions(images=images, captions=captions, out=out, progress=False, files=files[:10],
                              local_codec="none", faiss_factory="qdrant",
                              backend=qdrant_store.QdrantGlobalBackend(settings),
                              local_backend=qdrant_store.QdrantLocalBackend(settings)))
    before = float32_searcher(out, model)  # a server on this version does not see the rows being added
    report = add(model, out, BuildOptions(images=images, captions=captions, out=out, progress=False))
    assert report["images_added"] == len(files) - 10
    assert max(len(r.hits) for r in before.search_text(TEXTS, k=20, candidates=100)) == 10
    assert verify(out) == []
    reference, searcher = float32_searcher(faiss_index, model), float32_searcher(out, model)
    assert_same(reference.search_text(TEXTS, k=10, candidates=100), searcher.search_text(TEXTS, k=10, candidates=100))

    gone = searcher.search_text(["a cat with green eyes"], k=1)[0].hits[0].id
    report = delete(out, [gone])
    assert report["images_deleted"] == 1 and report["captions_deleted_with_images"] >= 1
    searcher = float32_searcher(out, model)
    assert gone not in [h.id for r in searcher.search_text(TEXTS, k=20, candidates=100) for h in r.hits]
    assert all(h.image_id != gone for r in searcher.search_image(photo_queries(photos), k=30, candidates=100)
               for h in r.hits)
    collection = searcher.index.images.index.collection
    assert collection.engine.count(collection.name, None) == Index(out).manifest["counts"]["images"]
    assert verify(out) == []


@pytest.mark.parametrize("argv, message", [
    (["--store", "qdrant", "--qdrant-url", "http://127.0.0.1:9"], "cannot reach the Qdrant server at http://127.0.0.1:9"),
    (["--store", "qdrant", "--qdrant-url", "ftp://x"], "--qdrant-url must be an http:// or https:// URL"),
    (["--store", "qdrant"], "needs exactly one of --qdrant-url URL and --qdrant-path DIR"),
    (["--store", "qdrant", "--qdrant-url", "http://a:1", "--qdrant-path", "x"], "needs exactly one of"),
    (["--qdrant-path", "somewhere"], "--qdrant-path needs --store qdrant"),
    (["--store", "qdrant", "--qdrant-path", "q", "--local-codec", "SQ8"], "--local-codec does not apply"),
])
def test_bad_connection_settings_are_one_line(photos, tmp_path, capsys, argv, message):
    out = tmp_path / "index"
    assert build_index(*photos, out, *argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_served_through_a_real_server_and_the_embedded_store_is_locked(qdrant_index, faiss_index, photos, model,
                                                                       capsys):
    from alignsearch.service.launch import serve

    in_sub = {"must": [{"key": "folder", "prefix": "sub"}]}
    reference = float32_searcher(faiss_index, model)
    expected = reference.search_text(TEXTS[:2], k=5, candidates=20)
    filtered = reference.search_text(TEXTS[:2], k=2, candidates=20, filter=in_sub, offset=1)
    qdrant_engines.release()  # this process's shards: the server opens them
    with serve(qdrant_index, ready_timeout=600) as url:  # a loaded machine starts it slowly
        for text, want, page in zip(TEXTS[:2], expected, filtered):
            body = httpx.post(f"{url}/search/text", json={"query": text, "k": 5, "candidates": 20, "explain": True},
                              timeout=60).json()
            assert [r["id"] for r in body["results"]] == [h.id for h in want.hits]
            assert body["results"][0]["grounding"]
            body = httpx.post(f"{url}/search/text", json={"query": text, "k": 2, "candidates": 20, "offset": 1,
                                                          "filter": in_sub}, timeout=60).json()
            assert [r["id"] for r in body["results"]] == [h.id for h in page.hits]  # a filter, page 2: as FAISS
            assert body["total"] == page.total and body["has_more"] == page.has_more
        with open(sample_files(photos[0])[0], "rb") as fh:
            response = httpx.post(f"{url}/search/image", files={"file": fh}, data={"k": "3"}, timeout=60)
        assert response.status_code == 200 and len(response.json()["results"]) == 3
        # the server holds the embedded store: another process's update is refused in one line
        assert main(["index", "verify", str(qdrant_index)]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert err and "is open in another process" in err[-1]



@pytest.mark.slow
def test_flickr8k_800_gives_the_same_top_10_both_ways(dataset_dir, tmp_path_factory, model):
    """The shared set (800 images, 4000 captions), encoded once into both stores (about 2 minutes on 2 cores)."""
    from alignsearch.bench.qdrant import build_pair, differences

    root = tmp_path_factory.mktemp("flickr-qdrant")
    faiss_dir, qdrant_dir = build_pair(model, dataset_dir / "images", dataset_dir / "captions.csv", root)
    reference, searcher = float32_searcher(faiss_dir, model), float32_searcher(qdrant_dir, model)
    assert searcher.index.manifest["counts"]["images"] == 800 and verify(qdrant_dir) == []
    texts = [r[0] for r in reference.index.conn.execute("SELECT text FROM captions ORDER BY row")][::20]
    got = differences(reference.search_text(texts, k=10, candidates=100),
                      searcher.search_text(texts, k=10, candidates=100))
    assert got["same_top_ids"] == got["queries"] == 200 and got["max_score_difference"] < 1e-4
    files = [dataset_dir / "images" / r[0] for r in reference.index.conn.execute("SELECT path FROM images")][::16]
    queries = [Image.open(f).convert("RGB") for f in files]
    got = differences(reference.search_image(queries, k=10, candidates=100),
                      searcher.search_image(queries, k=10, candidates=100))
    assert got["same_top_ids"] == got["queries"] == 50 and got["max_score_difference"] < 1e-4


@pytest.mark.slow
def test_scalar_quantization_scores_the_codes(faiss_index, photos, model, tmp_path):
    """With --qdrant-quantization scalar the MAX_SIM stage reads int8 codes: scores move a little, ranks hold."""
    root = tmp_path / "q"
    assert build_index(*photos, root / "index", "--store", "qdrant", "--qdrant-path", str(root / "qdrant"),
                       "--qdrant-quantization", "scalar") == 0
    qdrant_engines.release()
    searcher = float32_searcher(root / "index", model)
    assert searcher.index.manifest["local_codec"] == "scalar"
    exact = float32_searcher(faiss_index, model).search_text(TEXTS, k=3, candidates=20)
    got = searcher.search_text(TEXTS, k=3, candidates=20)
    gaps = [abs(x.score - y.score) for a, b in zip(exact, got) for x, y in zip(a.hits, b.hits) if x.id == y.id]
    assert 0 < max(gaps) < 0.1  # the codes, not the float originals
    assert sum(a.hits[0].id == b.hits[0].id for a, b in zip(exact, got)) >= len(TEXTS) - 1
    assert_same(float32_searcher(faiss_index, model).search_image(photo_queries(photos)[:2], k=5, candidates=20),
                searcher.search_image(photo_queries(photos)[:2], k=5, candidates=20))  # originals: exact
