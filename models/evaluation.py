"""Retrieval recall as the papers count it, for global-only, exhaustive fine-grained and two-stage ranking.

Text-to-image: a hit when the caption's own image is in the top K. Image-to-text: a hit when any of the
image's captions is in the top K. In two-stage mode a ground truth outside the K candidates is a miss.
"""

from __future__ import annotations

import torch

RECALL_KS = (1, 5, 10)
MODES = ("global", "exhaustive", "two-stage")


def _ranks(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Rank (0-based) of each row's positive column; infinite where the positive was not a candidate."""
    pos = scores.gather(1, positive[:, None])
    rank = (scores > pos).sum(1).to(torch.float64)
    return torch.where(torch.isfinite(pos[:, 0]), rank, torch.full_like(rank, float("inf")))


def recall_metrics(text_image_scores: torch.Tensor, text_to_image: torch.Tensor,
                   i2t_scores: torch.Tensor | None = None) -> dict[str, float]:
    """R@1/5/10 both ways and rsum, in percent, from a texts x images score matrix.

    ``text_to_image[t]`` is the image of caption t. Entries of -inf are non-candidates. ``i2t_scores``
    (texts x images) is used for the image-to-text direction when candidates differ by direction.
    """
    t2i_rank = _ranks(text_image_scores, text_to_image)
    by_image = (text_image_scores if i2t_scores is None else i2t_scores).T  # images x texts
    n_images = by_image.shape[0]
    i2t_rank = torch.full((n_images,), float("inf"), dtype=torch.float64)
    for t, img in enumerate(text_to_image.tolist()):
        pos = by_image[img, t]
        if torch.isfinite(pos):
            i2t_rank[img] = min(i2t_rank[img].item(), float((by_image[img] > pos).sum()))
    has_caption = torch.zeros(n_images, dtype=torch.bool)
    has_caption[text_to_image] = True
    i2t_rank = i2t_rank[has_caption]
    out = {}
    for k in RECALL_KS:
        out[f"i2t_r{k}"] = 100.0 * float((i2t_rank < k).double().mean())
    for k in RECALL_KS:
        out[f"t2i_r{k}"] = 100.0 * float((t2i_rank < k).double().mean())
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return {k: round(v, 2) for k, v in out.items()}


def keep_top_k(scores: torch.Tensor, by: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """``scores`` where ``by`` ranks in the top k along ``dim``, -inf elsewhere (the first stage's cut)."""
    k = min(k, by.shape[dim])
    index = by.topk(k, dim=dim).indices
    keep = torch.zeros_like(by, dtype=torch.bool).scatter_(dim, index, True)
    return scores.masked_fill(~keep, float("-inf"))


def evaluate_scores(global_scores: torch.Tensor, fused_scores: torch.Tensor, text_to_image: torch.Tensor,
                    candidates: int) -> dict[str, dict[str, float]]:
    """The three modes from texts x images global and fused score matrices."""
    return {
        "global": recall_metrics(global_scores, text_to_image),
        "exhaustive": recall_metrics(fused_scores, text_to_image),
        "two-stage": recall_metrics(
            keep_top_k(fused_scores, global_scores, candidates, dim=1),
            text_to_image,
            keep_top_k(fused_scores, global_scores, candidates, dim=0),
        ),
    }


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A fixed-width table: one row per mode."""
    cols = [f"i2t_r{k}" for k in RECALL_KS] + [f"t2i_r{k}" for k in RECALL_KS] + ["rsum"]
    lines = [f"{'mode':<11}" + "".join(f"{c:>9}" for c in cols)]
    for mode, row in results.items():
        lines.append(f"{mode:<11}" + "".join(f"{row[c]:>9.1f}" for c in cols))
    return "\n".join(lines)


__all__ = ["MODES", "recall_metrics", "keep_top_k", "evaluate_scores", "format_table"]
