"""The build pipeline around the encoder: what it does without a serial step in the encoder's process (file facts
read by the decode processes, batches decoded as one task each, shard writes beside the next shard, float16 codes
taken as they are) gives the index the plain computation gives; and the build-ceiling benchmark's stand-in."""

from __future__ import annotations

import json
import sqlite3

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from alignsearch.indexer import photo_fields
from alignsearch.indexer.build import BuildOptions, build
from alignsearch.indexer.local_store import encode, make_codec
from alignsearch.indexer.reader import DecodePool, list_images
from alignsearch.models import load_model
from alignsearch.models.preprocess import ImagePreprocessor
from conftest import sample_files


@pytest.fixture(scope="module")
def model():
    return load_model(device="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos):
    """Eight sample photos (two in a subfolder), one with an EXIF capture date, and a broken file."""
    root = tmp_path_factory.mktemp("pipeline") / "images"
    (root / "sub").mkdir(parents=True)
    for n, path in enumerate(sample_files(photos[0])[:8]):
        (root / ("sub" if n % 4 == 0 else ".") / path.name).write_bytes(path.read_bytes())
    with Image.open(sample_files(photos[0])[0]) as image:
        exif = image.getexif()
        exif[0x0132] = "2021:05:01 10:30:00"
        image.convert("RGB").save(root / "dated.jpg", exif=exif)
    (root / "broken.jpg").write_bytes(b"not a photo")
    return root


def test_float16_vectors_are_their_sqfp16_codes_for_every_finite_half():
    halves = np.arange(65536, dtype=np.uint16).view(np.float16)
    halves = halves[np.isfinite(halves)][: 8 * (np.isfinite(halves).sum() // 8)].reshape(-1, 8)
    codec = make_codec(8, "SQfp16", np.zeros((0, 8), np.float32), train=False)
    assert np.array_equal(encode(codec, halves), codec.sa_encode(halves.astype(np.float32)))
    sq8 = make_codec(8, "SQ8", halves.astype(np.float32))  # another codec still encodes through FAISS
    assert np.array_equal(encode(sq8, halves), sq8.sa_encode(halves.astype(np.float32)))


def test_decode_processes_read_the_file_facts_assembly_would_read(folder):
    files = list_images(folder)
    pool = DecodePool(2, ImagePreprocessor(32, (0.5,) * 3, (0.5,) * 3))
    try:
        batches = list(pool.batches(folder, [files[i : i + 3] for i in range(0, len(files), 3)]))
    finally:
        pool.close()
    decoded = [d for batch in batches for d in batch]
    assert [d.rel for d in decoded] == files
    for batch in batches:  # one stacked array per batch, each photo's array a row of it
        good = [d for d in batch if d.error is None]
        assert batch.pixels.shape == (len(good), 32, 32, 3)
        assert all(np.shares_memory(d.array, batch.pixels) for d in good)
    for d in decoded:
        if d.error is not None:
            assert d.rel == "broken.jpg" and d.file is None
            continue
        item = {"id": d.rel, "path": d.rel, "width": d.width, "height": d.height}
        assert d.file == photo_fields.read_file_facts(folder / d.rel)
        assert photo_fields.file_fields({**item, "file": d.file}, folder) == photo_fields.file_fields(item, folder)
    assert next(d for d in decoded if d.rel == "dated.jpg").file["taken"] == [
        photo_fields.parse_date("2021-05-01T10:30:00Z")]


def _rows(index: str, table: str) -> list[tuple]:
    with sqlite3.connect(f"{index}/metadata.sqlite") as conn:
        return conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()


def test_build_equals_the_plain_computation(folder, model, tmp_path):
    """Vectors, codes and SQLite rows of a build (3 photos a shard, decode processes) against the same photos
    encoded one batch at a time in this process, coded by FAISS, and their fields read from the files."""
    out = tmp_path / "index"
    report = build(model, BuildOptions(images=folder, out=out, batch_size=2, workers=2, shard_size=3, progress=False))
    assert report["images_indexed"] == 9 and [s["item"] for s in report["skipped"]] == ["broken.jpg"]
    every = list_images(folder)
    files = [f for f in every if f != "broken.jpg"]
    pre = model.image_preprocessor
    batches = [[f for f in every[s : s + 3][b : b + 2] if f in files] for s in range(0, len(every), 3)
               for b in range(0, 3, 2)]  # as the build batches them: 2 at a time within each shard of 3
    plain = [model.encode_pixels(pre.normalize_tensor(np.stack([pre.load_file(folder / f)[0] for f in batch])))
             for batch in batches if batch]
    index = faiss.read_index(str(out / "images" / "global.faiss"))
    assert np.array_equal(index.reconstruct_n(0, index.ntotal), torch.cat([p.global_emb for p in plain]).numpy())
    local = torch.cat([p.local[p.mask] for p in plain]).half().float().numpy()
    codec = faiss.read_index(str(out / "images" / "codec.faiss"))
    assert np.array_equal(np.load(out / "images" / "codes.npy"), codec.sa_encode(local))
    assert [r[1:5] for r in _rows(out, "images")] == [
        (f, f, *Image.open(folder / f).size) for f in files]  # id, path, width, height (no rotated photos here)
    types = {name: kind for name, kind in _rows(out, "fields")}
    expected = []
    for row, f in enumerate(files):
        item = {"id": f, "path": f, "width": Image.open(folder / f).size[0], "height": Image.open(folder / f).size[1]}
        typed, _ = photo_fields.typed({row: photo_fields.file_fields(item, folder)}, types, {row: f})
        expected += [(row, name, v) for name, values in typed[row].items() for v in values]
    assert _rows(out, "image_fields") == expected
    assert ("taken" in types) and json.loads((out / "manifest.json").read_text())["counts"]["images"] == 9


def test_instant_encoders_give_the_model_shapes_and_dtypes_without_its_compute(model):
    from alignsearch.bench.build_ceiling import InstantEncoders

    instant = InstantEncoders(model, rows=4)
    pixels = torch.zeros(6, 3, 224, 224)
    real, fake = model.encode_pixels(pixels[:1]), instant.encode_pixels(pixels)
    assert fake.global_emb.shape == (6, real.global_emb.shape[1]) and fake.local.shape[1:] == real.local.shape[1:]
    assert (fake.global_emb.dtype, fake.local.dtype, fake.mask.dtype) == (real.global_emb.dtype, real.local.dtype,
                                                                          real.mask.dtype)
    assert torch.allclose(fake.global_emb.norm(dim=-1), torch.ones(6))
    assert instant.fingerprint == model.fingerprint and instant.device.type == "meta"
    assert InstantEncoders(model, on_cpu=True).device == model.device
    texts = instant.encode_texts(["a dog", "two cats"])
    assert texts.global_emb.shape == (2, model.embed_dim) and len(texts.words) == 2


def test_pixels_normalise_on_the_encoders_device_as_on_the_host():
    """The build hands the encoder's device uint8 pixels and normalises them there: on the CPU the same bits as
    the host path; on another device (``meta`` here: shapes only) nothing is computed on the host."""
    from alignsearch.indexer.encode import _to_device

    pre = ImagePreprocessor(8, (0.48, 0.45, 0.40), (0.26, 0.26, 0.27))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    host = pre.normalize_tensor(pixels)
    cpu = _to_device(torch.from_numpy(pixels), torch.device("cpu"))
    assert cpu.data_ptr() == torch.from_numpy(pixels).data_ptr()  # no copy on the CPU
    assert torch.equal(pre.normalize_tensor(cpu), host)
    meta = pre.normalize_tensor(_to_device(torch.from_numpy(pixels), torch.device("meta")))
    assert meta.device.type == "meta" and meta.shape == host.shape and meta.dtype == torch.float32
