"""Region-word alignment scores (TERAN, CHAN) and the TGDT fused score.

All functions take ``words`` (Nt x Tw x D), ``word_mask`` (Nt x Tw), ``regions`` (Ni x Tr x D) and
``region_mask`` (Ni x Tr), L2-normalised, and return an Nt x Ni score matrix; 1 query x K candidates is the
case Nt = 1 (or Ni = 1). Padded tokens never win a max and never add to a sum. Work is chunked over texts so
the Nt x Ni x Tw x Tr similarity block stays within ``max_block`` elements.

The pooling functions (``mrsw`` ...) take the similarity block ``sims`` (P1 x P2 x Tw x Tr) with masks either
as above (Nt x Tw, Ni x Tr: every text against every image) or per pair (P1 x P2 x Tw / P1 x P2 x Tr, size-1
axes broadcast): :func:`pair_scores` is the batched rerank's entry, where each query has its own candidates.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .config import ALIGNMENT_ALIASES, canonical_alignment

NEG = float("-inf")
MAX_BLOCK = 1 << 24


def token_similarities(words: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every word with every region: Nt x Ni x Tw x Tr."""
    return torch.einsum("awd,brd->abwr", words, regions)


def _words3(word_mask: torch.Tensor) -> torch.Tensor:
    """Word mask per pair: Nt x Tw -> Nt x 1 x Tw (a per-pair mask is returned as it is)."""
    return word_mask[:, None, :] if word_mask.dim() == 2 else word_mask


def _regions3(region_mask: torch.Tensor) -> torch.Tensor:
    """Region mask per pair: Ni x Tr -> 1 x Ni x Tr (a per-pair mask is returned as it is)."""
    return region_mask[None, :, :] if region_mask.dim() == 2 else region_mask


def _best_region(sims: torch.Tensor, word_mask: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
    """For each word, its best region's similarity (0 for padded words or no regions): P1 x P2 x Tw."""
    words, regions = _words3(word_mask), _regions3(region_mask)
    if not bool(regions.all()):  # image grids have no padded regions: no masked copy of the block
        sims = sims.masked_fill(~regions[:, :, None, :], NEG)
    best = sims.amax(dim=-1)
    valid = words & regions.any(-1)[:, :, None]
    return torch.where(valid, best, torch.zeros_like(best))


def _best_word(sims: torch.Tensor, word_mask: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
    """For each region, its best word's similarity: P1 x P2 x Tr."""
    words, regions = _words3(word_mask), _regions3(region_mask)
    best = sims.masked_fill(~words[:, :, :, None], NEG).amax(dim=-2)
    valid = regions & words.any(-1)[:, :, None]
    return torch.where(valid, best, torch.zeros_like(best))


def _n_words(word_mask: torch.Tensor) -> torch.Tensor:
    return _words3(word_mask).sum(-1).clamp_min(1).to(torch.float32)


def mrsw(sims, word_mask, region_mask, lse_lambda=0.0):
    """TERAN MrSw: sum over words of the best region."""
    return _best_region(sims, word_mask, region_mask).sum(-1)


def mravgw(sims, word_mask, region_mask, lse_lambda=0.0):
    """TERAN MrAVGw: mean over words of the best region (CHAN hard alignment with mean pooling)."""
    return mrsw(sims, word_mask, region_mask) / _n_words(word_mask)


def mwsr(sims, word_mask, region_mask, lse_lambda=0.0):
    """TERAN MwSr: sum over regions of the best word."""
    return _best_word(sims, word_mask, region_mask).sum(-1)


def symm(sims, word_mask, region_mask, lse_lambda=0.0):
    """TERAN Symm: MrSw + MwSr."""
    return mrsw(sims, word_mask, region_mask) + mwsr(sims, word_mask, region_mask)


def lse_norm(sims, word_mask, region_mask, lse_lambda=10.0):
    """Length-normalised log-sum-exp over words of the best region: (1/l) log mean_w exp(l * best_region(w)).

    Not CHAN's pooling: taking the mean (subtracting ``log n / l``) makes it independent of the caption's
    length, which changes image -> caption rankings; CHAN's own form is :func:`chan_logsumexp`."""
    words = _words3(word_mask)
    best = _best_region(sims, word_mask, region_mask) * lse_lambda
    best = best.masked_fill(~words, NEG)
    pooled = torch.logsumexp(best, dim=-1) - torch.log(_n_words(word_mask))
    pooled = torch.where(words.any(-1), pooled, torch.zeros_like(pooled))
    return pooled / lse_lambda


def chan_logsumexp(sims, word_mask, region_mask, lse_lambda=10.0):
    """CHAN's LSE pooling as the paper's code has it: log sum_w exp(best_region(w) / t), t = 1 / lse_lambda
    (0.1 by default). Neither normalised by the number of words nor scaled back by t."""
    words = _words3(word_mask)
    best = _best_region(sims, word_mask, region_mask) * lse_lambda
    best = best.masked_fill(~words, NEG)
    pooled = torch.logsumexp(best, dim=-1)
    return torch.where(words.any(-1), pooled, torch.zeros_like(pooled))


ALIGNMENT_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "MrSw": mrsw,
    "MrAVGw": mravgw,
    "MwSr": mwsr,
    "Symm": symm,
    "CHAN-mean": mravgw,
    "LSE-norm": lse_norm,
    "CHAN-logsumexp": chan_logsumexp,
}
ALIASES = ALIGNMENT_ALIASES  # old names still read from configs ("CHAN-lse" is "LSE-norm")
canonical = canonical_alignment


def pooling(method: str) -> Callable[..., torch.Tensor]:
    """The pooling function of ``method`` (a key of :data:`ALIGNMENT_FUNCTIONS` or :data:`ALIASES`)."""
    try:
        return ALIGNMENT_FUNCTIONS[canonical(method)]
    except KeyError:
        raise ValueError(f"unknown alignment {method!r}; choose from {sorted(ALIGNMENT_FUNCTIONS)}") from None


def pair_scores(sims: torch.Tensor, word_mask: torch.Tensor, region_mask: torch.Tensor, method: str = "MrSw",
                lse_lambda: float = 10.0) -> torch.Tensor:
    """Scores of a P1 x P2 grid of (text, image) pairs from their similarity block ``sims`` (P1 x P2 x Tw x Tr)
    and per-pair masks (P1 x P2 x Tw, P1 x P2 x Tr; size-1 axes broadcast): P1 x P2."""
    return pooling(method)(sims, word_mask.bool(), region_mask.bool(), lse_lambda)


def local_scores(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    regions: torch.Tensor,
    region_mask: torch.Tensor,
    method: str = "MrSw",
    lse_lambda: float = 10.0,
    max_block: int = MAX_BLOCK,
) -> torch.Tensor:
    """Texts x images alignment scores with ``method`` (a key of :data:`ALIGNMENT_FUNCTIONS` or :data:`ALIASES`)."""
    fn = pooling(method)
    word_mask, region_mask = word_mask.bool(), region_mask.bool()
    regions = regions.to(words.dtype)
    per_text = max(1, regions.shape[0] * max(1, regions.shape[1]) * max(1, words.shape[1]))
    step = max(1, max_block // per_text)
    if words.shape[0] <= step:
        return fn(token_similarities(words, regions), word_mask, region_mask, lse_lambda)
    return torch.cat([
        fn(token_similarities(words[i : i + step], regions), word_mask[i : i + step], region_mask, lse_lambda)
        for i in range(0, words.shape[0], step)
    ])


def fuse(global_scores: torch.Tensor, local: torch.Tensor, weight: float) -> torch.Tensor:
    """TGDT fused score: ``S = S_global + weight * S_local``."""
    return global_scores + weight * local


# Temperature of the softmax over regions that turns a word's region similarities into a confidence.
GROUNDING_TEMPERATURE = 0.05


def whole_word_groundings(
    pieces: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor, groups: Sequence[Sequence[int]],
    temperature: float = GROUNDING_TEMPERATURE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each whole word's best region, its similarity and a confidence, for one text and one image.

    ``pieces`` (P x D) are the text's word-piece vectors, ``regions`` (Tr x D) the image's, ``groups`` the
    piece positions of each word (see :func:`models.words.merge_pieces`). A word's similarity to a region is
    the mean of its pieces' cosine similarities to it (a one-piece word keeps its own). The confidence is
    the best region's probability under a softmax over the image's regions at ``temperature``: near 1 when
    one region stands out, ``1 / Tr`` when all are alike. Returns (index, similarity, confidence), one
    entry per group.
    """
    if not groups:
        empty = torch.zeros(0)
        return empty.long(), empty, empty
    sims = pieces @ regions.to(pieces.dtype).T  # P x Tr
    per_word = torch.stack([sims[list(g)].mean(0) for g in groups])  # W x Tr
    per_word = per_word.masked_fill(~region_mask.bool()[None, :], NEG)
    best, index = per_word.max(dim=-1)
    confidence = torch.softmax(per_word / temperature, dim=-1).gather(1, index[:, None])[:, 0]
    return index, best, confidence


__all__ = [
    "ALIASES", "ALIGNMENT_FUNCTIONS", "GROUNDING_TEMPERATURE", "canonical", "fuse", "local_scores", "pair_scores",
    "pooling", "token_similarities",
    "whole_word_groundings",
    "mrsw", "mravgw", "mwsr", "symm", "lse_norm", "chan_logsumexp",
]
