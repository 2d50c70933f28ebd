"""Mosaic grounding: tiles, mosaics, content-word masks, the grounding loss and the pointing measure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from alignsearch.models.mosaic import (MOSAIC_SIDE, MOSAIC_TILES, content_token_mask, make_mosaics, plan_mosaics,
                                       tile_cells, tile_grounding_loss, tile_pointing)


def test_every_cell_of_a_7x7_grid_lies_in_exactly_one_tile():
    inside = tile_cells((7, 7))
    assert inside.shape == (4, 49)
    assert torch.all(inside.sum(0) == 1)
    assert inside.sum(1).tolist() == [16, 12, 12, 9]  # the tiles meet at the 4th grid line
    assert inside[0, 0] and inside[3, 48] and inside[1, 4] and not inside[0, 4]


def test_mosaics_hold_four_distinct_photos_and_are_seeded():
    plan = plan_mosaics(10, 50, seed=3)
    assert len(plan) == 50 and all(len(set(m.items)) == 4 and max(m.items) < 10 for m in plan)
    assert plan == plan_mosaics(10, 50, seed=3) and plan != plan_mosaics(10, 50, seed=4)
    with pytest.raises(ValueError, match="needs 4 photos"):
        plan_mosaics(3, 1, seed=0)


def test_each_photo_fills_its_own_tile(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    paths = []
    for n, colour in enumerate(colours):
        paths.append(tmp_path / f"{n}.png")
        Image.new("RGB", (60 + 10 * n, 40), colour).save(paths[-1])
    (mosaic,) = make_mosaics(paths, plan_mosaics(4, 1, seed=0))
    order = plan_mosaics(4, 1, seed=0)[0].items
    assert mosaic.size == (MOSAIC_SIDE, MOSAIC_SIDE)
    for item, (x0, y0, x1, y1) in zip(order, MOSAIC_TILES):
        assert mosaic.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == colours[item]


def test_content_mask_marks_whole_content_words_at_their_token_positions():
    pieces = [["a", "dog", "rides", "a", "skate", "##board", "."]]
    token_mask = torch.tensor([[False, True, True, True, True, True, True, True, False]])  # [CLS] ... [SEP]
    content = content_token_mask(pieces, token_mask)
    assert content[0].nonzero().squeeze(-1).tolist() == [2, 3, 5, 6]  # dog, rides, skate, ##board


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_grounding_loss_is_low_when_words_point_into_their_tile_and_trains_the_regions():
    inside = torch.tensor([[True, True, False, False]])
    regions = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1])[None].requires_grad_(True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    content = torch.tensor([[True, True, False]])
    into = tile_grounding_loss(_unit([1, 0, 0], [0, 1, 0], [0, 0, 1])[None], content, regions, mask, inside, 0.1)
    away = tile_grounding_loss(_unit([0, 0, 1], [0, 0, 1], [1, 0, 0])[None], content, regions, mask, inside, 0.1)
    assert into.item() < 0.01 < 1.0 < away.item()
    away.backward()
    assert regions.grad is not None and float(regions.grad.abs().sum()) > 0
    padded = tile_grounding_loss(_unit([0, 0, 1])[None], torch.tensor([[True]]), regions.detach(),
                                 torch.tensor([[True, True, False, False]]), inside, 0.1)
    assert float(padded) == pytest.approx(0.0, abs=1e-6)  # padded regions take no probability


def test_pointing_counts_content_words_whose_best_cell_is_in_the_tile():
    inside = torch.tensor([[True, False, False, False]])
    regions = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1])[None]
    words = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1])[None]
    hits, n, chance = tile_pointing(words, torch.tensor([[True, True, False]]), regions,
                                    torch.ones(1, 4, dtype=torch.bool), inside)
    assert (hits, n) == (1, 2) and chance == pytest.approx(0.5)
