"""A Hugging Face CLIP (or SigLIP) model as a ready joint encoder.

Global = the model's own projected embeddings; local = patch / token states through the same projection,
so regions and words land in the space the model was trained for.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .backbones import CLIP_MEAN, CLIP_STD, Tokenizer, TokenizedText, _image_norm_stats, resolve_pretrained
from .preprocess import ImagePreprocessor


class HFJointModel(nn.Module):
    """Loads a CLIPModel / SiglipModel once and encodes both modalities into its joint space."""

    def __init__(self, name: str, image_size: int = 0, max_length: int = 64) -> None:
        super().__init__()
        from transformers import AutoModel

        folder = resolve_pretrained(name)
        self.net = AutoModel.from_pretrained(folder).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        vcfg = self.net.config.vision_config
        tcfg = self.net.config.text_config
        self.image_size = image_size or vcfg.image_size
        self.patch = vcfg.patch_size
        mean, std = _image_norm_stats(folder, self.net.config.model_type)
        self.preprocessor = ImagePreprocessor(self.image_size, mean, std)
        self.tokenizer = Tokenizer(folder, min(max_length, tcfg.max_position_embeddings))
        self.embed_dim = getattr(self.net.config, "projection_dim", None) or tcfg.hidden_size

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.preprocessor(images)

    def region_grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch
        return side, side

    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vision = self.net.vision_model(pixel_values=pixel_values)
        n_patches = (self.image_size // self.patch) ** 2
        patches = vision.last_hidden_state[:, -n_patches:]
        if hasattr(self.net, "visual_projection"):  # CLIP
            patches = self.net.visual_projection(self.net.vision_model.post_layernorm(patches))
            global_emb = self.net.visual_projection(vision.pooler_output)
        else:  # SigLIP: the attention-pooling head gives the global embedding
            global_emb = vision.pooler_output
        mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        return F.normalize(global_emb, dim=-1), F.normalize(patches, dim=-1), mask

    def encode_texts(self, text: TokenizedText) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.net.text_model(input_ids=text.input_ids, attention_mask=text.attention_mask)
        hidden = out.last_hidden_state
        if hasattr(self.net, "text_projection") and isinstance(self.net.text_projection, nn.Linear):
            hidden_p = self.net.text_projection(hidden)
            global_emb = self.net.text_projection(out.pooler_output)
        else:  # SigLIP text head
            hidden_p = self.net.text_model.head(hidden)
            global_emb = out.pooler_output
        mask = text.attention_mask.bool() & ~text.special_mask
        local = F.normalize(hidden_p, dim=-1) * mask.unsqueeze(-1)
        return F.normalize(global_emb, dim=-1), local, mask


__all__ = ["HFJointModel", "CLIP_MEAN", "CLIP_STD"]
