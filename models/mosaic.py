"""Mosaic grounding: where a caption's words point, learned and measured without boxes.

Flickr8k has captions but no boxes, and the region-word loss alone never asks a word's best region to sit on
the thing it names: the head's transformer may spread an image's content over every region and MrSw still
scores well. A 2 x 2 mosaic of four photos gives a box for free: each caption belongs to one tile, so its
content words should point into that tile.

- :func:`make_mosaics` composes the mosaics (photo ``i`` squashed into tile ``t``; the tiles meet at a grid
  line, so every cell lies in exactly one tile);
- :func:`tile_cells` says which grid cells a tile covers;
- :func:`tile_grounding_loss` is the training signal: for every content word, minus the log of the softmax
  mass of its region similarities that falls inside its caption's tile;
- :func:`tile_pointing` is the measure (the pointing game on mosaics): how often a content word's best cell
  lies in its tile, with the chance rate of a random cell.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from .preprocess import load_image
from .words import content_words

MOSAIC_SIDE = 224
# (x0, y0, x1, y1) in pixels; the split at 128 px is a cell boundary of a 7 x 7 grid of 32 px cells.
MOSAIC_TILES: tuple[tuple[int, int, int, int], ...] = (
    (0, 0, 128, 128), (128, 0, 224, 128), (0, 128, 128, 224), (128, 128, 224, 224),
)


@dataclass(frozen=True)
class Mosaic:
    """One mosaic: the items (indices into the photo list) placed in :data:`MOSAIC_TILES`, in order."""

    items: tuple[int, ...]


def plan_mosaics(n_items: int, count: int, seed: int) -> list[Mosaic]:
    """``count`` mosaics, each of four distinct items drawn at random with ``seed``."""
    if n_items < len(MOSAIC_TILES):
        raise ValueError(f"a mosaic needs {len(MOSAIC_TILES)} photos, got {n_items}")
    rng = random.Random(seed)
    return [Mosaic(tuple(rng.sample(range(n_items), len(MOSAIC_TILES)))) for _ in range(count)]


def make_mosaics(paths: Sequence[Path], mosaics: Sequence[Mosaic]) -> list[Image.Image]:
    """The mosaic images (``MOSAIC_SIDE`` square, RGB), each photo squashed into its tile."""
    cache: dict[int, Image.Image] = {}
    out = []
    for mosaic in mosaics:
        canvas = Image.new("RGB", (MOSAIC_SIDE, MOSAIC_SIDE))
        for item, (x0, y0, x1, y1) in zip(mosaic.items, MOSAIC_TILES):
            if item not in cache:
                cache[item] = load_image(paths[item])
            canvas.paste(cache[item].resize((x1 - x0, y1 - y0), Image.BICUBIC), (x0, y0))
        out.append(canvas)
    return out


def tile_cells(grid: tuple[int, int], side: int = MOSAIC_SIDE) -> torch.Tensor:
    """tiles x cells bool: cell (row-major) whose centre lies in the tile."""
    rows, cols = grid
    ys = (torch.arange(rows, dtype=torch.float32) + 0.5) * side / rows
    xs = (torch.arange(cols, dtype=torch.float32) + 0.5) * side / cols
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    cy, cx = cy.reshape(-1), cx.reshape(-1)
    return torch.stack([(cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1) for x0, y0, x1, y1 in MOSAIC_TILES])


def content_token_mask(pieces: Sequence[Sequence[str]], token_mask: torch.Tensor) -> torch.Tensor:
    """B x T bool: the token positions of ``token_mask`` (real word pieces, in order) that belong to content
    words (:func:`models.words.content_words`: whole words less stopwords and punctuation)."""
    out = torch.zeros_like(token_mask, dtype=torch.bool)
    for row, words in enumerate(pieces):
        positions = token_mask[row].nonzero().squeeze(-1)
        for word in content_words(words):
            keep = [p for p in word.pieces if p < len(positions)]
            out[row, positions[keep]] = True
    return out


def tile_grounding_loss(words: torch.Tensor, content: torch.Tensor, regions: torch.Tensor,
                        region_mask: torch.Tensor, inside: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over content words of ``-log sum_{r in tile} softmax_r(sim(word, r) / T)``.

    ``words`` B x Tw x D and ``content`` B x Tw (the caption's content pieces), ``regions`` B x Tr x D and
    ``region_mask`` B x Tr (the mosaic's cells), ``inside`` B x Tr (cells of the caption's own tile)."""
    sims = (words @ regions.transpose(1, 2)) / temperature
    sims = sims.masked_fill(~region_mask.bool()[:, None, :], float("-inf"))
    log_p = sims.log_softmax(-1)
    in_tile = log_p.masked_fill(~(inside & region_mask.bool())[:, None, :], float("-inf")).logsumexp(-1)
    content = content.float()
    return -(in_tile.nan_to_num(neginf=-30.0) * content).sum() / content.sum().clamp_min(1.0)


def tile_pointing(words: torch.Tensor, content: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor,
                  inside: torch.Tensor) -> tuple[int, int, float]:
    """(hits, content words, expected hits of a random cell): a word's best cell inside its tile is a hit."""
    sims = (words @ regions.transpose(1, 2)).masked_fill(~region_mask.bool()[:, None, :], float("-inf"))
    best = sims.argmax(-1)  # B x Tw
    hit = inside.gather(1, best) & content
    chance = (inside & region_mask.bool()).sum(-1).float() / region_mask.sum(-1).clamp_min(1).float()
    return int(hit.sum()), int(content.sum()), float((chance[:, None] * content.float()).sum())


__all__ = ["MOSAIC_SIDE", "MOSAIC_TILES", "Mosaic", "content_token_mask", "make_mosaics", "plan_mosaics",
           "tile_cells", "tile_grounding_loss", "tile_pointing"]
