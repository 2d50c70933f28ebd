"""The on-disk index on real images with the shipped model: build, resume after SIGKILL, verify, add/delete,
bad inputs, and two-stage search equal to the exhaustive computation when K covers the collection."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from alignsearch.indexer import layout
from alignsearch.indexer.index import Index, verify
from alignsearch.indexer.search import Searcher
from alignsearch.models import load_model
from alignsearch.cli import main

from conftest import (N_CAPTIONS, N_IMAGES, build_index as _build, default_regions, demo_captions, encode_as_built,
                      kill_after_first_shard, sample_files)


@pytest.fixture(scope="module")
def model():
    return load_model(device="cpu")


def test_build_counts_and_skips_bad_items(built, capsys):
    assert main(["index", "info", str(built)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"]["images"] == N_IMAGES
    assert info["counts"]["captions"] == N_CAPTIONS + 1  # the empty caption skipped, the standalone kept
    assert info["images"]["faiss_type"] == "IndexFlat"
    assert info["images"]["bytes_per_item"]["local"] == pytest.approx(default_regions() * 384 * 2 + 8, abs=20)  # SQfp16 + offset (+ .npy headers)
    report = json.loads((built / "build_report.json").read_text())
    skipped = {s["item"]: s["reason"] for s in report["skipped"]}
    assert {"garbage.jpg", "empty.png", "truncated.jpg"} <= set(skipped)
    assert any(r == "empty caption" for r in skipped.values())
    index = Index(built)
    lone = index.conn.execute("SELECT * FROM captions WHERE image_id IS NULL").fetchall()
    assert len(lone) == 1 and json.loads(lone[0]["extra"])["source"] == "user"
    nested = index.conn.execute("SELECT id FROM images WHERE id LIKE 'sub/%'").fetchall()
    assert len(nested) == N_IMAGES // 4  # found recursively, ids are relative paths
    row = index.image_by_id(nested[0]["id"])
    assert row["width"] > 0 and row["height"] > 0


def test_verify_names_a_flipped_byte_in_any_data_file(built, tmp_path, capsys):
    assert main(["index", "verify", str(built)]) == 0
    for name in layout.data_files(built):
        copy = tmp_path / name.replace("/", "_")
        shutil.copytree(built, copy)
        path = copy / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        assert main(["index", "verify", str(copy)]) == 1
        assert name in capsys.readouterr().err
        with pytest.raises(layout.IndexError_, match=name):
            Index(copy)


def test_files_hashed_side_by_side_give_each_file_its_own_sha256_and_every_problem_is_named(built, tmp_path):
    import hashlib

    names = layout.data_files(built)
    assert len(names) > 2
    assert layout.sha256_files(built, names) == {n: hashlib.sha256((built / n).read_bytes()).hexdigest()
                                                for n in names}
    copy = tmp_path / "two-problems"
    shutil.copytree(built, copy)
    flipped, cut = "images/" + layout.GLOBAL_FILE, layout.METADATA
    data = bytearray((copy / flipped).read_bytes())
    data[-1] ^= 0xFF
    (copy / flipped).write_bytes(bytes(data))
    (copy / cut).write_bytes((copy / cut).read_bytes()[:-1])
    problems = layout.check_files(copy, layout.read_manifest(copy))
    assert problems == [f"{cut}: size {(copy / cut).stat().st_size} != {(built / cut).stat().st_size} in the manifest",
                        f"{flipped}: checksum does not match the manifest"]


def _drop(key):
    return lambda m: {k: v for k, v in m.items() if k != key}


@pytest.mark.parametrize("mangle", [
    lambda m: {"format_version": 1}, lambda m: [], lambda m: [m], lambda m: "manifest", lambda m: None,
    _drop("files"), _drop("collections"), lambda m: {**m, "files": []}, lambda m: {**m, "counts": "many"},
    lambda m: {**m, "files": {"metadata.sqlite": "abc"}}, lambda m: {**m, "model": {}},
    lambda m: {**m, "collections": {"images": {}}},
], ids=["only-version", "empty-list", "list", "string", "null", "no-files", "no-collections", "files-list",
        "counts-string", "file-entry-string", "model-empty", "one-collection"])
@pytest.mark.parametrize("command", ["info", "verify"])
def test_a_structurally_wrong_manifest_is_a_one_line_refusal(built, tmp_path, capsys, mangle, command):
    manifest = json.loads((built / layout.MANIFEST).read_text())
    (tmp_path / layout.MANIFEST).write_text(json.dumps(mangle(manifest)))
    assert main(["index", command, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt manifest" in err and "internal error" not in err
    with pytest.raises(layout.IndexError_, match="corrupt manifest"):
        Index(tmp_path)


@pytest.mark.slow
def test_search_equals_exhaustive_when_k_covers_the_collection(built, model):
    searcher = Searcher(Index(built), model)
    queries = ["a dog runs through the grass", "children playing", "a man on a bike", "people in the snow"]
    results = searcher.search_text(queries, k=N_IMAGES, candidates=N_IMAGES)
    ids = [m["id"] for m in searcher.index.rows("images", list(range(N_IMAGES))).values()]
    images = encode_as_built(model, [searcher.index.images_root / i for i in ids])  # ids are relative paths
    texts = model.encode_texts(queries)
    exhaustive = model.scores(texts, images)
    for q, res in enumerate(results):
        assert len(res.hits) == N_IMAGES
        scores = [h.score for h in res.hits]
        assert scores == sorted(scores, reverse=True)
        expected = [ids[i] for i in torch.argsort(exhaustive[q], descending=True, stable=True).tolist()]
        got = [h.id for h in res.hits]
        # SQfp16 decoding may swap items whose scores differ by less than its rounding
        close = torch.isclose(torch.tensor(scores), exhaustive[q].sort(descending=True).values, atol=2e-3)
        assert bool(close.all()), (scores, exhaustive[q])
        assert got[:3] == expected[:3] or abs(scores[0] - scores[1]) < 2e-3
        assert set(res.timings_ms) == {"encode", "coarse", "rerank", "total"}


def test_caption_finds_its_image_and_image_finds_its_captions(built, model):
    searcher = Searcher(Index(built), model)
    index = searcher.index
    caption = index.conn.execute("SELECT text, image_id FROM captions WHERE image_id = 'rocket.jpg'").fetchone()
    hits = searcher.search_text([caption["text"]], k=5, candidates=10, explain=True)[0].hits
    assert caption["image_id"] in [h.id for h in hits]
    grounding = hits[0].grounding
    assert grounding and all(0 <= g["region"] < default_regions() and len(g["cell"]) == 2 for g in grounding)
    from alignsearch.models.preprocess import load_image

    image_id = caption["image_id"]
    res = searcher.search_image([load_image(index.images_root / image_id)], k=10, candidates=50)[0]
    assert any(h.image_id == image_id for h in res.hits[:5])
    assert all(h.caption for h in res.hits)


@pytest.mark.slow
def test_add_then_delete_round_trips(built, photos, tmp_path, model):
    from PIL import Image, ImageOps

    index_dir = tmp_path / "index"
    shutil.copytree(built, index_dir)
    extra = tmp_path / "more"
    extra.mkdir()
    new_name = "mirrored-rocket.png"  # a new photo: the rocket, mirrored, with the rocket's captions
    rocket = next(p for p in sample_files(photos[0]) if p.name == "rocket.jpg")
    ImageOps.mirror(Image.open(rocket)).save(extra / new_name)
    texts = [r["caption"] for r in demo_captions() if r["image"] == "rocket.jpg"]
    caps = tmp_path / "more.jsonl"
    caps.write_text("".join(json.dumps({"image": new_name, "caption": t}) + "\n" for t in texts))
    assert main(["index", "add", str(index_dir), "--images", str(extra), "--captions", str(caps), "--quiet"]) == 0
    assert verify(index_dir) == []
    searcher = Searcher(Index(index_dir), model)
    assert Path(searcher.get_image(new_name)["file"]) == (extra / new_name).resolve()  # added from another folder
    query = texts[0]
    assert new_name in [h.id for h in searcher.search_text([query], k=3, candidates=20)[0].hits]

    assert main(["index", "delete", str(index_dir), "--ids", new_name, f"{new_name}#0"]) == 0
    assert verify(index_dir) == []
    searcher = Searcher(Index(index_dir), model)
    hits = searcher.search_text([query], k=50, candidates=50)[0].hits
    assert new_name not in [h.id for h in hits]
    from alignsearch.models.preprocess import load_image

    cap_hits = searcher.search_image([load_image(extra / new_name)], k=200, candidates=200)[0].hits
    assert cap_hits and not any(h.id.startswith(f"{new_name}#") for h in cap_hits)  # its captions went with it
    assert searcher.get_image(new_name) is None


def test_model_fingerprint_mismatch_is_refused(built, tmp_path):
    from alignsearch.models import ModelConfig, create_model, save_model

    save_model(create_model(ModelConfig()), tmp_path / "other")
    other = load_model(tmp_path / "other", device="cpu")
    with pytest.raises(layout.IndexError_, match="fingerprint") as err:
        Searcher(Index(built), other)
    # built with a shipped model: the message names it, so an upgrade's new default is one flag away
    assert "built with the shipped model 'default': pass --model default" in str(err.value)


def test_bad_factory_string_is_a_clear_error(photos, tmp_path, capsys):
    assert _build(*photos, tmp_path / "x", "--faiss-factory", "NotAnIndex") == 2
    assert "invalid FAISS factory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_nothing_indexed_exits_non_zero(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"nope")
    code = main(["index", "build", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2 and "nothing was indexed" in capsys.readouterr().err


def _collection_arrays(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for name in layout.COLLECTIONS:
        index = faiss.read_index(str(folder / name / layout.GLOBAL_FILE))
        out[f"{name}.global"] = index.index.reconstruct_n(0, index.ntotal)
        out[f"{name}.ids"] = faiss.vector_to_array(index.id_map)
        out[f"{name}.codes"] = np.load(folder / name / layout.CODES_FILE)
        out[f"{name}.offsets"] = np.load(folder / name / layout.OFFSETS_FILE)
    return out


@pytest.mark.slow
def test_build_killed_mid_way_resumes_to_the_same_index(photos, tmp_path):
    images, captions = photos
    out = tmp_path / "index"
    cmd = [sys.executable, "-m", "alignsearch", "index", "build", "--images", str(images), "--captions",
           str(captions), "--out", str(out), "--quiet", "--shard-size", "2", "--batch-size", "2"]
    shards = kill_after_first_shard(cmd, out)
    done_before = len(list(shards.glob("images-*[0-9]")))
    assert done_before < (N_IMAGES + 3 + 1) // 2
    assert subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True).returncode == 0
    assert not out.with_name("index.partial").exists()
    built = tmp_path / "clean"
    assert _build(images, captions, built, "--shard-size", "2", "--batch-size", "2") == 0
    resumed, clean = _collection_arrays(out), _collection_arrays(built)
    for key in clean:
        np.testing.assert_array_equal(resumed[key], clean[key], err_msg=key)
    assert Index(out).rows("images", list(range(N_IMAGES))) == Index(built).rows("images", list(range(N_IMAGES)))


@pytest.mark.parametrize("codec", ["SQfp16", "SQ8", "PQ8"])
def test_local_store_gather_decodes_like_sa_decode(tmp_path, codec):
    from alignsearch.indexer import local_store

    rng = np.random.default_rng(0)
    lengths = np.array([3, 5, 1, 4, 5])
    vectors = rng.standard_normal((int(lengths.sum()), 16)).astype(np.float32)
    coder = local_store.make_codec(16, codec, vectors)
    codes = local_store.encode(coder, vectors)  # PQ: may break ties between equal centroids unlike sa_encode
    local_store.write_store(tmp_path, coder, codes, lengths)
    store = local_store.LocalStore.open(tmp_path)
    assert store.fp16 == (codec == "SQfp16")
    reference = coder.sa_decode(codes)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for rows in ([1, 4], [0, 2, 3], [4]):
        local, mask = store.gather(np.array(rows))
        assert local.shape == (len(rows), lengths[rows].max(), 16)
        for i, r in enumerate(rows):
            np.testing.assert_array_equal(local[i][mask[i]].numpy(), reference[offsets[r] : offsets[r + 1]])
            assert int(mask[i].sum()) == lengths[r] and torch.all(local[i][~mask[i]] == 0)


@pytest.mark.parametrize("factory", ["IVF64,Flat", "OPQ4_16,IVF64,PQ4"])
def test_ivf_returns_k_candidates_when_it_holds_k(factory):
    from alignsearch.indexer.faiss_index import FaissGlobalStore, new_index, set_search_params

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 16)).astype(np.float32)
    faiss.normalize_L2(vectors)
    index = new_index(16, factory, vectors)
    index.add_with_ids(vectors, np.arange(400, dtype=np.int64) + 1000)
    set_search_params(index, "nprobe=1")  # one list of 64 holds ~6 vectors: far fewer than k
    store = FaissGlobalStore(index, factory)
    scores, ids = store.search(vectors[:5], 300)
    assert (ids >= 1000).all() and all(len(set(row)) == 300 for row in ids.tolist())
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # still best first
    scores, ids = store.search(vectors[:2], 450)  # more than it holds: all 400, then -1
    assert ((ids >= 0).sum(axis=1) == 400).all() and (ids[:, 400:] == -1).all()
    assert faiss.extract_index_ivf(index).nprobe == 1  # the shared index's setting is left as it was
