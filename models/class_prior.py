"""A zero-shot class prior for the image encoder (ConSE / DeViSE).

The image backbone's ImageNet classifier gives a class distribution for the whole image (from the pooled
feature) and for every grid cell (the classifier is linear, so it applies to each cell's feature as well).
The names of the top classes, embedded by the locked text tower, turn that distribution into a vector in the
text space: ``prior = normalize(sum_c p(c) * name(c))`` over the ``top_k`` classes (Norouzi et al., "Zero-Shot
Learning by Convex Combination of Semantic Embeddings", ICLR 2014). The encoder mixes it into its learned
output with a learned weight: ``normalize(learned + w * prior)``, once for the global vector (sentence-level
name embeddings) and once per region (word-level name embeddings). With ``confidence_gate`` the weight also
follows how sure the classifier is, ``w * exp(s * (max_c p(c) - 0.5))`` per image and per region, with the
slope ``s`` learned from 0: a confident classifier (an object it knows) can say more than a confused one. The head is trained with the prior in
place, so it learns what the classifier does not already say.

The name embeddings are buffers saved with the head's weights: loading a model never re-encodes the names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import PriorConfig

CLASS_NAME_FILES = {"imagenet": Path(__file__).resolve().parent / "data" / "imagenet_classes.txt"}


def load_class_names(name: str) -> list[str]:
    """The class names of a packaged label set (``imagenet``: 1000 names in class-index order)."""
    path = CLASS_NAME_FILES.get(name)
    if path is None:
        raise ValueError(f"unknown class name set {name!r}; choose from {sorted(CLASS_NAME_FILES)}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def sparse_distribution(logits: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """softmax(logits / T) with all but the ``top_k`` largest entries zeroed and the rest renormalised."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if 0 < top_k < probs.shape[-1]:
        top = probs.topk(top_k, dim=-1)
        probs = torch.zeros_like(probs).scatter_(-1, top.indices, top.values)
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
    return probs


def class_name_mixture(logits: torch.Tensor, names: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """``normalize(sparse_distribution(logits) @ names)`` (... x C logits, C x D names -> ... x D), gathering only
    the ``top_k`` rows of ``names`` instead of a dense C-wide product."""
    if not 0 < top_k < logits.shape[-1]:
        return F.normalize(sparse_distribution(logits, top_k, temperature) @ names, dim=-1)
    top = torch.softmax(logits / temperature, dim=-1).topk(top_k, dim=-1)
    mixed = (top.values.unsqueeze(-1) * names[top.indices]).sum(-2)  # the renormalisation cancels in normalize
    return F.normalize(mixed, dim=-1)


class ClassPrior(nn.Module):
    """Class distributions -> probability-weighted class-name embeddings, mixed into the encoder's output."""

    def __init__(self, cfg: PriorConfig, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("name_global", torch.zeros(num_classes, embed_dim))
        self.register_buffer("name_local", torch.zeros(num_classes, embed_dim))
        init = torch.tensor(float(cfg.weight_init)).log()
        self.log_weight_global = nn.Parameter(init.clone(), requires_grad=cfg.learn_weights)
        self.log_weight_local = nn.Parameter(init.clone(), requires_grad=cfg.learn_weights and cfg.local)
        self.gate_slope_global: nn.Parameter | None = None  # the confidence gate's slopes, when it is on
        self.gate_slope_local: nn.Parameter | None = None
        if cfg.confidence_gate:
            self.gate_slope_global = nn.Parameter(torch.zeros(()), requires_grad=cfg.learn_weights)
            self.gate_slope_local = nn.Parameter(torch.zeros(()), requires_grad=cfg.learn_weights and cfg.local)

    @torch.no_grad()
    def initialize(self, encode_names: Callable[[Sequence[str], str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fill the name embeddings: ``encode_names(texts, prompt)`` -> (sentence vectors, name-token mean vectors)."""
        names = load_class_names(self.cfg.classes)
        if len(names) != self.name_global.shape[0]:
            raise ValueError(f"{len(names)} class names for a {self.name_global.shape[0]}-way classifier")
        g_sum = torch.zeros_like(self.name_global)
        l_sum = torch.zeros_like(self.name_local)
        for prompt in self.cfg.prompts:
            g, local = encode_names([prompt.format(n) for n in names], prompt)
            g_sum += F.normalize(g.float(), dim=-1)
            l_sum += F.normalize(local.float(), dim=-1)
        self.name_global.copy_(F.normalize(g_sum, dim=-1))
        self.name_local.copy_(F.normalize(l_sum, dim=-1))

    def forward(
        self, learned_global: torch.Tensor, learned_local: torch.Tensor, mask: torch.Tensor,
        global_logits: torch.Tensor, region_logits: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix the prior into the learned global (B x D) and per-region (B x T x D) embeddings."""
        cfg = self.cfg
        prior_global = class_name_mixture(global_logits, self.name_global, cfg.top_k, cfg.temperature)
        weight = self._weight(self.log_weight_global, self.gate_slope_global, global_logits)
        out_global = F.normalize(learned_global + weight * prior_global, dim=-1)
        if not cfg.local:
            return out_global, learned_local
        prior_local = class_name_mixture(region_logits, self.name_local, cfg.top_k, cfg.temperature)
        weight = self._weight(self.log_weight_local, self.gate_slope_local, region_logits)
        out_local = F.normalize(learned_local + weight * prior_local, dim=-1)
        return out_global, out_local * mask.unsqueeze(-1)

    def _weight(self, log_weight: torch.Tensor, slope: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        """The prior's weight: a scalar, or per row (... x 1) when the confidence gate is on."""
        if slope is None:
            return log_weight.exp()
        confidence = torch.softmax(logits / self.cfg.temperature, dim=-1).amax(-1, keepdim=True)
        return (log_weight + slope * (confidence - 0.5)).exp()
