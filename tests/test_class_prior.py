"""The ConSE class prior: sparse class distributions, class-name vectors, mixing, and save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alignsearch.models import BackboneConfig, ModelConfig, create_model, load_model, save_model
from alignsearch.models.class_prior import ClassPrior, class_name_mixture, load_class_names, sparse_distribution
from alignsearch.models.config import PriorConfig


def test_imagenet_names_ship_in_class_index_order():
    names = load_class_names("imagenet")
    assert len(names) == 1000
    assert names[0] == "tench" and names[285] == "Egyptian Mau" and names[812] == "space shuttle"
    with pytest.raises(ValueError, match="unknown class name set"):
        load_class_names("no-such-set")


def test_sparse_distribution_keeps_top_k_and_renormalises():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    p = sparse_distribution(logits, top_k=2, temperature=1.0)
    assert torch.count_nonzero(p) == 2 and p[0, 0] > p[0, 1] > 0
    torch.testing.assert_close(p.sum(-1), torch.ones(1))
    hot = sparse_distribution(logits, top_k=0, temperature=100.0)  # 0 keeps all; a high T flattens
    assert torch.count_nonzero(hot) == 5 and float(hot.max() - hot.min()) < 0.02


@pytest.mark.parametrize("top_k", [0, 3, 7])
def test_gathered_mixture_equals_the_dense_product(top_k):
    logits, names = torch.randn(2, 5, 7), F.normalize(torch.randn(7, 4), dim=-1)
    dense = F.normalize(sparse_distribution(logits, top_k, 0.7) @ names, dim=-1)
    torch.testing.assert_close(class_name_mixture(logits, names, top_k, 0.7), dense)


def test_prior_pulls_the_embedding_towards_the_predicted_class_name():
    prior = ClassPrior(PriorConfig(top_k=1, weight_init=1.0), num_classes=3, embed_dim=4)
    prior.name_global.copy_(torch.eye(4)[:3])
    prior.name_local.copy_(torch.eye(4)[:3])
    learned = F.normalize(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), dim=-1)
    logits = torch.tensor([[0.0, 5.0, 0.0]])  # class 1
    g, local = prior(learned, learned[:, None].repeat(1, 2, 1), torch.tensor([[True, False]]), logits,
                     logits[:, None].repeat(1, 2, 1))
    torch.testing.assert_close(g, F.normalize(torch.tensor([[0.0, 1.0, 0.0, 1.0]]), dim=-1))
    torch.testing.assert_close(local[0, 0], g[0])
    assert torch.all(local[0, 1] == 0)  # padded regions stay zero


def test_prior_needs_a_classifier_and_a_locked_text_tower():
    with pytest.raises(ValueError, match="classifier"):
        create_model(ModelConfig(image_backbone=BackboneConfig("precomputed", feature_dim=8),
                                 class_prior=PriorConfig()))


@pytest.fixture(scope="module")
def sample_photo():
    skimage = pytest.importorskip("skimage")
    from pathlib import Path

    from PIL import Image

    return Image.open(Path(skimage.__file__).parent / "data" / "chelsea.png").convert("RGB")


@pytest.fixture(scope="module")
def prior_model():
    config = ModelConfig(class_prior=PriorConfig(top_k=5))
    return create_model(config).eval()


@pytest.mark.slow
def test_class_name_vectors_sit_near_the_query_words_for_the_class(prior_model):
    names = load_class_names("imagenet")
    cat = names.index("tabby cat")
    words = prior_model.encode_texts(["a tabby cat", "a rocket"])
    sims = prior_model.class_prior.name_local @ words.local[0, words.mask[0]].T  # 1000 x 3 words
    assert int(sims[:, 1:].amax(1).argmax()) in {cat, names.index("tiger cat"), names.index("Persian cat")}
    sentence = prior_model.class_prior.name_global @ words.global_emb.T
    assert int(sentence[:, 0].argmax()) in {cat, names.index("tiger cat")}


@pytest.mark.slow
def test_prior_model_saves_and_loads_without_re_encoding_names(prior_model, tmp_path, monkeypatch, sample_photo):
    save_model(prior_model, tmp_path / "m")
    monkeypatch.setattr(ClassPrior, "initialize", lambda *a, **k: pytest.fail("names re-encoded on load"))
    loaded = load_model(tmp_path / "m", device="cpu")
    torch.testing.assert_close(loaded.class_prior.name_global, prior_model.class_prior.name_global)
    a, b = prior_model.encode_images([sample_photo]), loaded.encode_images([sample_photo])
    torch.testing.assert_close(a.global_emb, b.global_emb)
    torch.testing.assert_close(a.local, b.local)


@pytest.mark.slow
def test_prior_points_a_cat_photo_at_the_cat_query(prior_model, sample_photo):
    """Untrained heads know nothing; the prior alone already ranks 'a cat' above unrelated queries."""
    prior_model.class_prior.log_weight_global.data.fill_(torch.tensor(50.0).log())  # the prior dominates
    try:
        image = prior_model.encode_images([sample_photo]).global_emb
        texts = prior_model.encode_texts(["a cat", "a rocket on the launch pad", "a cup of coffee"]).global_emb
    finally:
        prior_model.class_prior.log_weight_global.data.fill_(torch.tensor(0.43).log())
    assert int((texts @ image.T).argmax()) == 0


def test_confidence_gate_starts_neutral_and_then_lets_a_sure_classifier_say_more():
    def prior_with(gate: bool) -> ClassPrior:
        prior = ClassPrior(PriorConfig(top_k=1, weight_init=1.0, local=False, confidence_gate=gate), 3, 4)
        prior.name_global.copy_(torch.eye(4)[:3])
        return prior

    learned = F.normalize(torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 2), dim=-1)
    logits = torch.tensor([[0.0, 9.0, 0.0], [0.0, 0.3, 0.0]])  # sure of class 1; unsure (but still class 1)
    regions, mask = learned[:, None], torch.ones(2, 1, dtype=torch.bool)
    gated, plain = prior_with(True), prior_with(False)
    torch.testing.assert_close(gated(learned, regions, mask, logits, logits[:, None])[0],
                               plain(learned, regions, mask, logits, logits[:, None])[0])
    with torch.no_grad():
        gated.gate_slope_global.fill_(3.0)
    g = gated(learned, regions, mask, logits, logits[:, None])[0]
    assert g[0, 1] > g[1, 1]  # the sure image moved further towards the class name
    assert "gate_slope_global" in gated.state_dict() and "gate_slope_global" not in plain.state_dict()


def test_the_prior_scalars_get_their_own_learning_rate_without_weight_decay():
    from pathlib import Path

    from alignsearch.models.train import TrainOptions, parameter_groups

    model = nn.Module()
    model.head = nn.Linear(4, 4)
    model.class_prior = ClassPrior(PriorConfig(top_k=1, weight_init=0.5, local=True), 3, 4)
    options = TrainOptions(dataset=Path("d"), images=Path("i"), out=Path("o"), lr=5e-4)
    (only,) = parameter_groups(model, options)
    assert len(only["params"]) == 4 and only["peak_lr"] == 5e-4
    options.prior_lr = 5e-2
    rest, prior = parameter_groups(model, options)
    assert {id(p) for p in prior["params"]} == {id(p) for p in model.class_prior.parameters()}
    assert prior["peak_lr"] == prior["lr"] == 5e-2 and prior["weight_decay"] == 0.0
    assert rest["peak_lr"] == 5e-4 and "weight_decay" not in rest  # the optimizer's own default applies
    opt = torch.optim.AdamW(parameter_groups(model, options), lr=options.lr, weight_decay=0.05)
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 5e-2]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
