"""Training losses over a B x B score matrix whose diagonal holds the matching pairs (texts x images)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hardest_negative_triplet(scores: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """VSE++ / TERAN hinge loss with the hardest in-batch negative, both directions, summed over the batch."""
    positive = scores.diag()
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_text = (margin + scores - positive[:, None]).clamp_min(0).masked_fill(eye, 0)  # text -> wrong images
    cost_image = (margin + scores - positive[None, :]).clamp_min(0).masked_fill(eye, 0)  # image -> wrong texts
    return cost_text.amax(1).sum() + cost_image.amax(0).sum()


def info_nce(scores: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss) with a fixed temperature, mean over the batch."""
    logits = scores / temperature
    target = torch.arange(scores.shape[0], device=scores.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


LOSSES = {"triplet": hardest_negative_triplet, "infonce": info_nce}
