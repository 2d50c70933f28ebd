"""The model fingerprint covers what changes vectors (config less scoring, head weights, backbone files) and
nothing else; an index refuses a model whose fingerprint differs, in one line; older indexes migrate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import build_index
from alignsearch.indexer import layout
from alignsearch.indexer.index import Index
from alignsearch.indexer.search import Searcher
from alignsearch.models import BackboneConfig, HeadConfig, ModelConfig, create_model, load_model, save_model
from alignsearch.models.identity import RULE, file_sha256
from alignsearch.cli import main


@pytest.fixture()
def tiny_model(tmp_path, tiny_vit, tiny_bert):
    """A tiny model whose text backbone is a private copy (so the test can change its files)."""
    bert = tmp_path / "bert"
    shutil.copytree(tiny_bert, bert)
    config = ModelConfig(image_backbone=BackboneConfig("hf-vision", tiny_vit, image_size=32),
                         text_backbone=BackboneConfig("hf-text", str(bert)), embed_dim=16,
                         image_head=HeadConfig(layers=1, heads=2), text_head=HeadConfig(layers=1, heads=2))
    torch.manual_seed(0)
    save_model(create_model(config), tmp_path / "model")
    return tmp_path / "model", bert


def _retrain_backbone(bert) -> None:
    """Replace the backbone's weights with other ones (as a package upgrade would)."""
    from transformers import BertModel

    torch.manual_seed(123)
    BertModel(BertModel.from_pretrained(bert).config).save_pretrained(bert)


def test_scoring_fields_are_outside_the_fingerprint_and_weights_inside(tiny_model):
    folder, bert = tiny_model
    before = load_model(folder, device="cpu").fingerprint
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "local_weight": 0.7, "alignment": "CHAN-lse"}))
    assert load_model(folder, device="cpu").fingerprint == before  # a search setting: no rebuild
    assert load_model(folder, device="cpu").config.alignment == "LSE-norm"  # the old name loads as the new
    (folder / "config.json").write_text(json.dumps({**config, "text_backbone": {**config["text_backbone"],
                                                                                 "max_length": 16}}))
    assert load_model(folder, device="cpu").fingerprint != before  # changes the vectors
    (folder / "config.json").write_text(json.dumps(config))
    _retrain_backbone(bert)
    assert load_model(folder, device="cpu").fingerprint != before


def test_a_changed_backbone_is_refused_at_open_in_one_line(tiny_model, photos, tmp_path):
    folder, bert = tiny_model
    out = tmp_path / "idx"
    assert build_index(*photos, out, "--model", str(folder), "--device", "cpu") == 0
    Searcher(Index(out), load_model(folder, device="cpu"))  # the same model opens it
    _retrain_backbone(bert)
    with pytest.raises(layout.IndexError_, match="fingerprint") as err:
        Searcher(Index(out), load_model(folder, device="cpu"))
    assert "\n" not in str(err.value) and "backbone" in str(err.value)


def test_an_index_of_the_previous_fingerprint_rule_opens_and_migrates_on_update(tiny_model, photos, tmp_path):
    folder, _ = tiny_model
    out = tmp_path / "idx"
    assert build_index(*photos, out, "--model", str(folder), "--device", "cpu") == 0
    model = load_model(folder, device="cpu")
    manifest = json.loads((out / layout.MANIFEST).read_text())
    del manifest["model"]["fingerprint_rule"]
    manifest["model"]["fingerprint"] = model.legacy_fingerprint  # what the rule-1 build recorded
    layout.seal_manifest(out, manifest)  # as `index verify --seal` seals an older one
    Searcher(Index(out), model)
    migrated = tmp_path / "migrated"
    shutil.copytree(out, migrated)
    (tmp_path / "none").mkdir()
    assert main(["index", "add", str(migrated), "--images", str(tmp_path / "none"), "--model", str(folder),
                 "--device", "cpu", "--quiet"]) == 0  # the next update records the current rule
    assert Index(migrated).manifest["model"]["fingerprint"] == model.fingerprint
    assert Index(migrated).manifest["model"]["fingerprint_rule"] == RULE
    manifest["model"]["fingerprint"] = "0123456789abcdef"
    layout.seal_manifest(out, manifest)  # as `index verify --seal` seals an older one
    with pytest.raises(layout.IndexError_, match="fingerprint"):
        Searcher(Index(out), model)


def test_file_hashes_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "weights.bin"
    path.write_bytes(b"abc")
    first = file_sha256(path)
    assert first == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert str(path) in (tmp_path / "cache" / "alignsearch" / "file-sha256.json").read_text()
    path.write_bytes(b"abcd")  # another size: hashed again
    assert file_sha256(path) != first
