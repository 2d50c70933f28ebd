"""Trainable heads: transformer layers over backbone tokens, projected into the joint space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import TokenFeatures
from .config import HeadConfig


class TokenHead(nn.Module):
    """TERAN-style encoder with a TGDT-style global token.

    Tokens are projected to ``embed_dim``; a learned global token (seeded with the projected pooled
    backbone feature) is prepended; ``layers`` pre-norm transformer layers mix them. Output 0 is the global
    embedding, the rest are the per-token (region or word) embeddings; all L2-normalised.
    """

    def __init__(self, in_dim: int, embed_dim: int, cfg: HeadConfig) -> None:
        super().__init__()
        self.in_proj = nn.Linear(in_dim, embed_dim)
        self.in_norm = nn.LayerNorm(embed_dim)
        self.pool_proj = nn.Linear(in_dim, embed_dim)
        self.global_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        layer = nn.TransformerEncoderLayer(
            embed_dim, cfg.heads, embed_dim * cfg.ff_mult, cfg.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False) if cfg.layers else None
        self.out_norm = nn.LayerNorm(embed_dim)
        self.out_global = nn.Linear(embed_dim, embed_dim)
        self.out_local = nn.Linear(embed_dim, embed_dim)

    def forward(self, feats: TokenFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.in_norm(self.in_proj(feats.tokens))
        g = self.global_token + self.pool_proj(feats.pooled).unsqueeze(1)
        seq = torch.cat([g, x], dim=1)
        if self.encoder is not None:
            keep = torch.cat([torch.ones_like(feats.mask[:, :1]), feats.mask], dim=1)
            seq = self.encoder(seq, src_key_padding_mask=~keep)
        seq = self.out_norm(seq)
        global_emb = F.normalize(self.out_global(seq[:, 0]), dim=-1)
        local = F.normalize(self.out_local(seq[:, 1:]), dim=-1) * feats.mask.unsqueeze(-1)
        return global_emb, local


class LockedHead(nn.Module):
    """No trainable parameters: the backbone's own space is the joint space (LiT's locked tower).

    Global = the L2-normalised pooled feature (for MiniLM: its sentence embedding), local = the normalised
    token features. The other modality's head learns to map into this space."""

    def forward(self, feats: TokenFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        global_emb = F.normalize(feats.pooled, dim=-1)
        local = F.normalize(feats.tokens, dim=-1) * feats.mask.unsqueeze(-1)
        return global_emb, local
