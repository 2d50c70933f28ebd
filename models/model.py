"""The joint image-text model: backbones + heads, encoding each modality separately into one space."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import alignment
from .backbones import (
    EfficientNetBackbone, HFTextBackbone, HFVisionBackbone, ImageBackbone, PrecomputedBackbone, TokenFeatures,
    TokenizedText,
)
from .class_prior import ClassPrior
from .clip_backbone import HFJointModel
from .config import ModelConfig
from .heads import LockedHead, TokenHead
from .preprocess import ImagePreprocessor


@dataclass
class EncoderOutput:
    """``global_emb`` B x D, ``local`` B x T x D (both L2-normalised), ``mask`` B x T (True = real token).

    Texts also carry their word pieces (``words``, aligned with the True entries of ``mask``) and whether
    each was truncated to the model's length limit.
    """

    global_emb: torch.Tensor
    local: torch.Tensor
    mask: torch.Tensor
    words: list[list[str]] | None = None
    truncated: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return self.global_emb.shape[0]

    def cpu(self) -> "EncoderOutput":
        return EncoderOutput(self.global_emb.cpu(), self.local.cpu(), self.mask.cpu(), self.words, self.truncated)

    def select(self, indices: Sequence[int]) -> "EncoderOutput":
        """The rows ``indices`` of this batch."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return EncoderOutput(
            self.global_emb[idx], self.local[idx], self.mask[idx],
            None if self.words is None else [self.words[i] for i in indices],
            [self.truncated[i] for i in indices] if self.truncated else [],
        )

    @staticmethod
    def concat(parts: Sequence["EncoderOutput"]) -> "EncoderOutput":
        """Join batches, padding the token axis to the longest."""
        width = max(p.local.shape[1] for p in parts)
        local = torch.cat([_pad_tokens(p.local, width) for p in parts])
        mask = torch.cat([_pad_tokens(p.mask, width) for p in parts])
        words = None if parts[0].words is None else [w for p in parts for w in (p.words or [])]
        return EncoderOutput(
            torch.cat([p.global_emb for p in parts]), local, mask, words, [t for p in parts for t in p.truncated]
        )


def _pad_tokens(x: torch.Tensor, width: int) -> torch.Tensor:
    pad = width - x.shape[1]
    if pad == 0:
        return x
    shape = (x.shape[0], pad) + tuple(x.shape[2:])
    return torch.cat([x, torch.zeros(shape, dtype=x.dtype, device=x.device)], dim=1)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available")
    return device


def _build_image_backbone(config: ModelConfig) -> ImageBackbone:
    kind = config.image_backbone.kind
    if kind == "efficientnet":
        return EfficientNetBackbone(config.image_backbone)
    if kind == "hf-vision":
        return HFVisionBackbone(config.image_backbone)
    return PrecomputedBackbone(config.image_backbone)


def _resized(pixel_values: torch.Tensor, pre: ImagePreprocessor | None) -> torch.Tensor:
    """Normalised pixels at ``pre``'s input size (bilinear with antialiasing: a tower of a combined model gets the
    larger tower's input scaled down)."""
    assert pre is not None
    if tuple(pixel_values.shape[-2:]) == (pre.size, pre.size):
        return pixel_values
    return F.interpolate(pixel_values, size=(pre.size, pre.size), mode="bilinear", align_corners=False, antialias=True)


class AlignModel(nn.Module):
    """Image encoder + text encoder + alignment settings, built from a :class:`ModelConfig`."""

    def __init__(self, config: ModelConfig, text_backbone: HFTextBackbone | None = None) -> None:
        """``text_backbone``: an already loaded text tower to share (a global companion's is its owner's)."""
        super().__init__()
        self.config = config
        self.joint: HFJointModel | None = None
        self.class_prior: ClassPrior | None = None
        self.companion: AlignModel | None = None
        if "hf-clip" in (config.image_backbone.kind, config.text_backbone.kind):
            if config.image_backbone.kind != config.text_backbone.kind or (
                config.image_backbone.name != config.text_backbone.name
            ):
                raise ValueError("an hf-clip model must be both the image and the text backbone")
            self.joint = HFJointModel(
                config.image_backbone.name, config.image_backbone.image_size, config.text_backbone.max_length
            )
            self.embed_dim = self.joint.embed_dim
            return
        self.image_backbone = _build_image_backbone(config)
        self.text_backbone = text_backbone if text_backbone is not None else HFTextBackbone(config.text_backbone)
        self.embed_dim = config.embed_dim
        if config.image_head is None:
            raise ValueError("backbones other than hf-clip need an image_head")
        self.image_head = TokenHead(self.image_backbone.feature_dim, config.embed_dim, config.image_head)
        if config.text_head is None:  # locked text tower: its own space is the joint space
            if config.embed_dim != self.text_backbone.feature_dim:
                raise ValueError(f"a locked text tower needs embed_dim == {self.text_backbone.feature_dim}")
            self.text_head = LockedHead()
        else:
            self.text_head = TokenHead(self.text_backbone.feature_dim, config.embed_dim, config.text_head)
        if config.class_prior is not None:
            if not self.image_backbone.num_classes:
                raise ValueError(f"a class prior needs an image backbone with a classifier, "
                                 f"not {config.image_backbone.kind!r}")
            if config.text_head is not None:
                raise ValueError("a class prior needs a locked text tower (text_head: null)")
            self.class_prior = ClassPrior(config.class_prior, self.image_backbone.num_classes, config.embed_dim)
        if config.global_companion is not None:
            self.companion = self._build_companion(config)

    def _build_companion(self, config: ModelConfig) -> "AlignModel":
        other = config.global_companion.model
        if other.text_head is not None or config.text_head is not None or other.text_backbone != config.text_backbone:
            raise ValueError("a global companion must share this model's locked text tower (same text backbone, "
                             "no text head on either)")
        if other.embed_dim != config.embed_dim:
            raise ValueError("a global companion must have this model's embed_dim")
        companion = AlignModel(other, text_backbone=self.text_backbone)
        if companion.image_preprocessor is None or self.image_preprocessor is None:
            raise ValueError("a global companion and its owner must both read images (not precomputed features)")
        if (companion.image_preprocessor.mean != self.image_preprocessor.mean).any() or (
                companion.image_preprocessor.std != self.image_preprocessor.std).any():
            raise ValueError("a global companion must normalise pixels as its owner does")
        return companion

    # -- properties -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def takes_images(self) -> bool:
        """False when the image side expects precomputed region features."""
        return self.joint is not None or not isinstance(self.image_backbone, PrecomputedBackbone)

    def region_grid(self) -> tuple[int, int] | None:
        """(rows, cols) when image regions are grid cells (row-major), else None (boxes or unknown)."""
        if self.joint is not None:
            return self.joint.region_grid()
        return self.image_backbone.region_grid()

    def train(self, mode: bool = True) -> "AlignModel":
        """Heads follow ``mode``; frozen backbones always stay in eval mode (BatchNorm statistics fixed)."""
        super().train(mode)
        if self.joint is not None:
            self.joint.eval()
        else:
            self.image_backbone.eval()
            self.text_backbone.eval()
        return self

    # -- pieces (training uses these on cached backbone features) --------------------------------------
    @property
    def image_preprocessor(self) -> ImagePreprocessor | None:
        """The plain image preprocessor (picklable: worker processes can resize for it), or None when the
        image backbone takes precomputed features. With a global companion, the larger input of the two: each
        tower gets the pixels resized down to its own (:meth:`encode_pixels`)."""
        source = self.joint if self.joint is not None else self.image_backbone
        own = getattr(source, "preprocessor", None)
        other = self.companion.image_preprocessor if self.companion is not None else None
        return other if own is not None and other is not None and other.size > own.size else own

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.companion is not None:
            assert self.image_preprocessor is not None
            return self.image_preprocessor(images)
        source = self.joint if self.joint is not None else self.image_backbone
        return source.preprocess(images)

    def tokenize(self, texts: Sequence[str]) -> TokenizedText:
        tokenizer = self.joint.tokenizer if self.joint is not None else self.text_backbone.tokenizer
        return tokenizer(texts)

    def image_features(self, pixel_values: torch.Tensor) -> TokenFeatures:
        return self.image_backbone(pixel_values)

    def text_features(self, text: TokenizedText) -> TokenFeatures:
        return self.text_backbone(text)

    def image_head_forward(self, feats: TokenFeatures) -> EncoderOutput:
        g, local = self.image_head(feats)
        if self.class_prior is not None:
            g, local = self.class_prior(g, local, feats.mask, self.image_backbone.class_logits(feats.pooled),
                                        self.image_backbone.class_logits(feats.tokens))
        return EncoderOutput(g, local, feats.mask)

    @torch.inference_mode()
    def encode_class_names(self, texts: Sequence[str], prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompted class names -> (sentence vectors, mean of the name's own word vectors), in the text space.

        ``prompt`` is the template that made ``texts`` (``"a photo of a {}."``): its words around the name are
        left out of the word-level vector, so that vector sits where a query word for the class would."""
        prefix, suffix = prompt.split("{}")
        tok = self.text_backbone.tokenizer.tok
        n_prefix, n_suffix = len(tok.tokenize(prefix)), len(tok.tokenize(suffix))
        out = self.encode_texts(texts, batch_size=128)
        local = []
        for row in range(len(out)):
            idx = out.mask[row].nonzero().squeeze(-1)
            name = idx[n_prefix : len(idx) - n_suffix] if len(idx) > n_prefix + n_suffix else idx
            local.append(out.local[row, name].mean(0))
        return out.global_emb, torch.stack(local)

    def text_head_forward(self, feats: TokenFeatures) -> EncoderOutput:
        g, local = self.text_head(feats)
        return EncoderOutput(g, local, feats.mask)

    # -- inference ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor) -> EncoderOutput:
        """Preprocessed pixels (B x 3 x H x W) -> joint-space embeddings."""
        pixel_values = pixel_values.to(self.device)
        if self.joint is not None:
            return EncoderOutput(*self.joint.encode_images(pixel_values))
        if self.companion is None:
            return self.image_head_forward(self.image_features(pixel_values))
        out = self.image_head_forward(self.image_features(_resized(pixel_values, self.image_backbone.preprocessor)))
        companion = self.companion
        other = companion.image_head_forward(companion.image_features(
            _resized(pixel_values, companion.image_preprocessor))).global_emb
        weight = self.config.global_companion.weight
        out.global_emb = F.normalize((1.0 - weight) * out.global_emb + weight * other.to(out.global_emb.dtype), dim=-1)
        return out

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> EncoderOutput:
        """PIL images -> joint-space embeddings (``global_emb``, per-region ``local``, ``mask``)."""
        if not self.takes_images:
            raise TypeError("this model reads precomputed region features: use encode_region_features")
        parts = [
            self.encode_pixels(self.preprocess_images(images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
        return EncoderOutput.concat(parts).cpu()

    @torch.inference_mode()
    def encode_region_features(
        self, features: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None
    ) -> EncoderOutput:
        """Precomputed region features (B x N x C, e.g. bottom-up 36 x 2048) -> joint-space embeddings."""
        if not isinstance(getattr(self, "image_backbone", None), PrecomputedBackbone):
            raise TypeError("this model encodes images, not precomputed features")
        feats = torch.as_tensor(features, dtype=torch.float32, device=self.device)
        m = None if mask is None else torch.as_tensor(mask, dtype=torch.bool, device=self.device)
        return self.image_head_forward(self.image_backbone(feats, m)).cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> EncoderOutput:
        """Texts -> joint-space embeddings (``global_emb``, per-word-piece ``local``, ``mask``, ``words``)."""
        parts = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenize(texts[i : i + batch_size]).to(self.device)
            if self.joint is not None:
                out = EncoderOutput(*self.joint.encode_texts(tok))
            else:
                out = self.text_head_forward(self.text_features(tok))
            out.words, out.truncated = tok.words, tok.truncated
            parts.append(out)
        return EncoderOutput.concat(parts).cpu()

    # -- scoring -----------------------------------------------------------------------------------------
    def local_scores(self, texts: EncoderOutput, images: EncoderOutput) -> torch.Tensor:
        """Region-word alignment scores, texts x images, with the configured alignment."""
        return alignment.local_scores(
            texts.local, texts.mask, images.local, images.mask, self.config.alignment, self.config.lse_lambda
        )

    def scores(self, texts: EncoderOutput, images: EncoderOutput) -> torch.Tensor:
        """TGDT fused score ``S_global + w * S_local``, texts x images."""
        return alignment.fuse(
            texts.global_emb @ images.global_emb.T, self.local_scores(texts, images), self.config.local_weight
        )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a model folder stores: the heads and any unfrozen backbone parameters."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        heads = ("image_head.", "text_head.", "class_prior.")
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if (k in trainable and not k.startswith("companion.text_backbone.")) or k.startswith(heads)
            or k.startswith(tuple(f"companion.{h}" for h in heads))
        }
