"""CPU and GPU give the same rankings on the Flickr8k-800 test split (100 photos, 500 captions).

Runs only where a CUDA GPU is present (and the dataset is): the index is built once with the CPU model, then
searched by a CPU and a GPU searcher. With the same query encodings the rankings are the same up to near-ties
(the GPU reranks in half precision); with each device encoding its own queries, recall agrees."""

from __future__ import annotations

import json
import pytest
import torch

from alignsearch.indexer.build import BuildOptions, build
from alignsearch.indexer.index import Index
from alignsearch.indexer.search import SearchResult, Searcher
from alignsearch.models.data import load_dataset, select_split
from alignsearch.models.factory import load_model
from alignsearch.models.preprocess import load_image

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
NEAR_TIE = 5e-3  # relative: half-precision rerank on the GPU against float32 on the CPU


@pytest.fixture(scope="module")
def searchers(dataset_dir, tmp_path_factory) -> dict:
    records = select_split(load_dataset(dataset_dir / "dataset_flickr8k.json"), "test")
    tmp = tmp_path_factory.mktemp("gpu-index")
    captions = tmp / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image": r.filename, "caption": c}) + "\n"
                                for r in records for c in r.captions))
    cpu_model, gpu_model = load_model(device="cpu"), load_model(device="cuda")
    build(cpu_model, BuildOptions(images=dataset_dir / "images", out=tmp / "index", captions=captions,
                                  files=[r.filename for r in records], progress=False))
    return {"cpu": Searcher(Index(tmp / "index"), cpu_model), "cuda": Searcher(Index(tmp / "index"), gpu_model),
            "files": [r.filename for r in records], "images": dataset_dir / "images"}


def _texts(searcher: Searcher) -> tuple[list[str], list[str]]:
    rows = searcher.index.conn.execute("SELECT text, image_id FROM captions ORDER BY row").fetchall()
    return [r["text"] for r in rows], [r["image_id"] for r in rows]


def _same_up_to_near_ties(a: list[SearchResult], b: list[SearchResult]) -> float:
    """Assert each position holds the same item unless the two scores there are a near-tie; the share of
    queries whose top hit is the same."""
    same_top = 0
    for x, y in zip(a, b, strict=True):
        assert len(x.hits) == len(y.hits)
        for hx, hy in zip(x.hits, y.hits):  # a swap is allowed only between near-tied scores
            assert abs(hx.score - hy.score) < NEAR_TIE * max(1.0, abs(hx.score)), (hx.id, hx.score, hy.id, hy.score)
        same_top += x.hits[0].id == y.hits[0].id
    return same_top / len(a)


def test_the_gpu_reranks_the_same_encodings_into_the_cpu_ranking(searchers):
    cpu, gpu = searchers["cpu"], searchers["cuda"]
    assert gpu.reranker.device.type == "cuda" and cpu.reranker.device.type == "cpu"
    texts, _ = _texts(cpu)
    enc = cpu.model.encode_texts(texts)
    assert _same_up_to_near_ties(cpu.search_text_encoded(enc, 10, 20), gpu.search_text_encoded(enc, 10, 20)) >= 0.99
    enc_images = cpu.model.encode_images([load_image(searchers["images"] / f) for f in searchers["files"]])
    assert _same_up_to_near_ties(cpu.search_image_encoded(enc_images, 10, 20),
                                 gpu.search_image_encoded(enc_images, 10, 20)) >= 0.99


def _recall_at(results: list[SearchResult], truth: list[str], k: int) -> float:
    return 100.0 * sum(t in [h.id for h in r.hits[:k]] for r, t in zip(results, truth)) / len(truth)


def test_each_device_encoding_its_own_queries_finds_the_same_images(searchers):
    cpu, gpu = searchers["cpu"], searchers["cuda"]
    texts, truth = _texts(cpu)
    on_cpu, on_gpu = cpu.search_text(texts, 10, 20), gpu.search_text(texts, 10, 20)
    same_top = sum(a.hits[0].id == b.hits[0].id for a, b in zip(on_cpu, on_gpu)) / len(texts)
    assert same_top >= 0.97
    for k in (1, 5, 10):
        assert abs(_recall_at(on_cpu, truth, k) - _recall_at(on_gpu, truth, k)) <= 1.0
    assert _recall_at(on_cpu, truth, 10) > 50  # the real model on real photos, not noise
