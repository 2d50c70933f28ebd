"""The store interfaces: the FAISS global store's capabilities, the backend registry and the manifest's
record of it, the build's stages as plain data, and a distributor plugged into the build's seam."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import N_IMAGES
from alignsearch.indexer import layout, stores
from alignsearch.indexer.build import BuildOptions, build
from alignsearch.indexer.index import Index, verify
from alignsearch.indexer.plan import ShardTask, caption_tasks, image_tasks
from alignsearch.models import load_model


def _vectors(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("spec, real_deletes", [("Flat", True), ("IVF2,Flat", True), ("HNSW8,Flat", False)])
def test_faiss_global_store_round_trip_and_capabilities(tmp_path, spec, real_deletes):
    backend = stores.global_backend("faiss")
    vectors = _vectors(40)
    store = backend.create(8, spec, vectors)
    store.add(vectors, np.arange(100, 140))
    assert store.count() == 40 and store.real_deletes == real_deletes
    scores, ids = store.search(vectors[:3], 1)
    assert ids[:, 0].tolist() == [100, 101, 102]
    assert store.remove(np.array([100, 101])) == (2 if real_deletes else 0)
    store.save(tmp_path)
    entry = store.describe()
    assert entry["backend"] == "faiss" and entry["factory"] == spec
    opened = backend.open(tmp_path, entry)
    assert opened.count() == (38 if real_deletes else 40)
    if real_deletes:
        assert opened.ids().tolist() == list(range(102, 140))
    np.testing.assert_allclose(opened.vectors(np.array([105])), vectors[5:6], atol=1e-6)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(layout.IndexError_, match="unknown global store backend 'milvus'"):
        stores.global_backend("milvus")


def test_manifest_names_the_backends_and_old_manifests_still_open(built, tmp_path):
    manifest = Index(built).manifest
    for name in layout.COLLECTIONS:
        assert manifest["collections"][name]["backend"] == "faiss"
        assert manifest["collections"][name]["local_backend"] == "faiss-codec"
    old = tmp_path / "old"
    shutil.copytree(built, old)
    for entry in manifest["collections"].values():  # as written before the backends were recorded
        del entry["backend"], entry["local_backend"]
    layout.seal_manifest(old, manifest)  # as `index verify --seal` seals an older one
    assert Index(old).images.index.backend == "faiss" and verify(old) == []


def test_shard_tasks_are_plain_data():
    tasks = image_tasks([f"{i}.jpg" for i in range(5)], "/photos", "/photos", shard_size=2)
    assert [len(t.items) for t in tasks] == [2, 2, 1] and [t.number for t in tasks] == [0, 1, 2]
    assert [ShardTask.from_dict(json.loads(json.dumps(t.to_dict()))) for t in tasks] == tasks
    skipped = [{"item": "caption 3", "reason": "empty caption"}]
    (only,) = caption_tasks([], skipped, shard_size=2)  # nothing to encode: the skips still reach the report
    assert only.items == [] and only.skipped == skipped


class RecordingDistributor:
    """Another distributor: runs the tasks in reverse order after a JSON round trip, as a remote one would."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def run(self, tasks, work, make_mapper) -> None:
        from alignsearch.indexer.writer import is_done, write_shard

        mapper = make_mapper()
        for task in reversed(tasks):
            task = ShardTask.from_dict(json.loads(json.dumps(task.to_dict())))
            if not is_done(work, task.collection, task.number):
                self.seen.append((task.collection, task.number))
                write_shard(work, task.collection, task.number, mapper(task, lambda n: None))


@pytest.mark.slow
def test_a_distributor_plugs_into_the_build(photos, built, tmp_path):
    distributor = RecordingDistributor()
    out = tmp_path / "idx"
    report = build(load_model(device="cpu"), BuildOptions(images=photos[0], out=out, captions=photos[1], shard_size=4,
                                                          progress=False, distributor=distributor))
    assert report["images_indexed"] == N_IMAGES and verify(out) == []
    assert ("images", 0) in distributor.seen and ("captions", 0) in distributor.seen
    mine, reference = Index(out), Index(built)
    assert mine.manifest["counts"] == reference.manifest["counts"]
    assert mine.rows("images", list(range(N_IMAGES))) == reference.rows("images", list(range(N_IMAGES)))
