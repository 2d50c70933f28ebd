"""The benchmark's synthetic index: above ``DISTINCT`` photos the staged regions are reused in turn, and the
written index is still full size, with its own global vector per image."""

from types import SimpleNamespace

import numpy as np

from alignsearch.bench import synthetic
from alignsearch.indexer.index import Index


def _model(dim: int = 16) -> SimpleNamespace:
    return SimpleNamespace(embed_dim=dim, fingerprint="synthetic-test", source=None,
                           config=SimpleNamespace(to_dict=lambda: {}))


def test_collections_above_the_distinct_photos_reuse_their_regions(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK", 4)
    monkeypatch.setattr(synthetic, "DISTINCT", 8)
    folder = synthetic.write_synthetic_index(tmp_path / "idx", _model(), 19, regions=3, codec="SQfp16")
    index = Index(folder)
    store = index.images.store
    assert index.manifest["counts"]["images"] == 19 and index.images.index.index.ntotal == 19
    tokens, _ = store.gather(np.arange(19))
    # images 8..15 reuse the regions of 0..7, 16..18 those of 0..2; nothing of the staging folder is left
    assert np.array_equal(tokens[8:16].numpy(), tokens[:8].numpy())
    assert np.array_equal(tokens[16:19].numpy(), tokens[:3].numpy())
    assert not np.array_equal(tokens[4].numpy(), tokens[0].numpy())
    vectors = index.images.index.index.reconstruct_n(0, 19)
    assert np.abs(vectors[8:16] - vectors[:8]).max() > 0.1  # a global vector of its own
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not (tmp_path / "idx.shards").exists()
    assert synthetic.write_synthetic_index(tmp_path / "idx", _model(), 19, regions=3, codec="SQfp16") == folder
