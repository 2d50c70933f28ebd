"""The training feature cache: memory-mapped float16 arrays that an interrupted extraction continues, a finished
one reuses, and a change of preprocessing code rebuilds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import sample_files
from alignsearch.models import BackboneConfig, HeadConfig, ModelConfig
from alignsearch.models import features as feature_module
from alignsearch.models.factory import create_model


@pytest.fixture()
def model(tiny_vit, tiny_bert):
    config = ModelConfig(image_backbone=BackboneConfig("hf-vision", tiny_vit, image_size=32),
                         text_backbone=BackboneConfig("hf-text", tiny_bert), embed_dim=16,
                         image_head=HeadConfig(layers=1, heads=2), text_head=HeadConfig(layers=1, heads=2))
    return create_model(config).eval()


def _paths(photos, tmp_path):
    paths = sample_files(photos[0])[:10]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    return [*paths[:3], broken, *paths[3:]]


def test_cached_features_equal_uncached_and_are_memory_maps(model, photos, tmp_path):
    paths = _paths(photos, tmp_path)
    plain, failures = feature_module.image_features(model, paths, None, batch_size=4)
    cached, cached_failures = feature_module.image_features(model, paths, tmp_path / "cache", batch_size=4)
    assert isinstance(cached.tokens, np.memmap)
    assert [f for f, _ in failures] == [f for f, _ in cached_failures] == [str(paths[3])]
    assert cached.ok.tolist() == plain.ok.tolist()
    rows = torch.tensor([5, 0, 2, 9])
    a, b = plain.batch(rows, "cpu"), cached.batch(rows, "cpu")
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and torch.equal(a.pooled, b.pooled)
    again, _ = feature_module.image_features(model, paths, tmp_path / "cache", batch_size=4)  # reused: no compute
    assert torch.equal(again.batch(rows, "cpu").tokens, b.tokens)


def test_an_interrupted_extraction_continues_where_it_stopped(model, photos, tmp_path, monkeypatch):
    paths = _paths(photos, tmp_path)
    reference, _ = feature_module.image_features(model, paths, None, batch_size=4)
    real, calls = model.image_features, []

    def dies_on_third_batch(pixels):
        calls.append(len(pixels))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(pixels)

    monkeypatch.setattr(model, "image_features", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        feature_module.image_features(model, paths, tmp_path / "cache", batch_size=4)
    (partial,) = (tmp_path / "cache").glob("*.partial")
    assert json.loads((partial / "progress.json").read_text())["done"] == 8
    calls.clear()
    resumed, _ = feature_module.image_features(model, paths, tmp_path / "cache", batch_size=4)
    assert calls == [3]  # only the last 3 images were encoded again
    assert not list((tmp_path / "cache").glob("*.partial"))
    rows = torch.arange(len(paths))
    assert torch.equal(resumed.batch(rows, "cpu").tokens, reference.batch(rows, "cpu").tokens)
    assert resumed.ok.tolist() == reference.ok.tolist()


def test_a_change_of_preprocessing_rebuilds_the_cache(model, photos, tmp_path, monkeypatch):
    paths = _paths(photos, tmp_path)[:5]
    feature_module.image_features(model, paths, tmp_path / "cache", batch_size=4)
    real, calls = model.image_features, []
    monkeypatch.setattr(model, "image_features", lambda pixels: calls.append(len(pixels)) or real(pixels))
    feature_module.image_features(model, paths, tmp_path / "cache", batch_size=4)
    assert calls == []
    monkeypatch.setattr(feature_module, "preprocessing_stamp", lambda m: "another resize")
    feature_module.image_features(model, paths, tmp_path / "cache", batch_size=4)
    assert sum(calls) == 4  # every decodable image again
