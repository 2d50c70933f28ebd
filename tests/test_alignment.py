"""Alignment scores against small hand-computed examples, masking, and batching."""

import math

import pytest
import torch
import torch.nn.functional as F

from alignsearch.models import alignment

# Two words, three regions in 2-d; similarities are plain dot products.
WORDS = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # 1 text x 2 words
REGIONS = torch.tensor([[[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]]])  # 1 image x 3 regions
# sims: word0 = [0.6, 1.0, 0.0]; word1 = [0.8, 0.0, -1.0]
ALL = torch.ones(1, 2, dtype=torch.bool)
ALL_R = torch.ones(1, 3, dtype=torch.bool)


def score(method, wm=ALL, rm=ALL_R, **kw):
    return alignment.local_scores(WORDS, wm, REGIONS, rm, method, **kw)


def test_mrsw_sums_best_region_per_word():
    assert score("MrSw").item() == pytest.approx(1.0 + 0.8)


def test_mravgw_and_chan_mean_average_over_words():
    assert score("MrAVGw").item() == pytest.approx(0.9)
    assert score("CHAN-mean").item() == pytest.approx(0.9)


def test_mwsr_sums_best_word_per_region():
    assert score("MwSr").item() == pytest.approx(0.8 + 1.0 + 0.0)


def test_symm_is_both_directions():
    assert score("Symm").item() == pytest.approx(1.8 + 1.8)


def test_lse_norm_log_mean_exp_of_best_regions_and_its_old_name_still_loads():
    lam = 5.0
    expected = math.log((math.exp(lam * 1.0) + math.exp(lam * 0.8)) / 2) / lam
    assert score("LSE-norm", lse_lambda=lam).item() == pytest.approx(expected, rel=1e-5)
    assert score("CHAN-lse", lse_lambda=lam).item() == pytest.approx(expected, rel=1e-5)  # old configs
    assert "CHAN-lse" not in alignment.ALIGNMENT_FUNCTIONS  # not listed as a choice of its own


def test_chan_logsumexp_is_chans_exact_form():
    # CHAN: logsumexp over words of best_region / 0.1; no mean over words, no scaling back
    expected = math.log(math.exp(1.0 / 0.1) + math.exp(0.8 / 0.1))
    assert score("CHAN-logsumexp").item() == pytest.approx(expected, rel=1e-5)
    assert score("CHAN-logsumexp", lse_lambda=5.0).item() == pytest.approx(
        math.log(math.exp(5.0) + math.exp(4.0)), rel=1e-5)


def test_chan_logsumexp_grows_with_caption_length_where_lse_norm_does_not():
    words = torch.cat([WORDS, WORDS[:, :1]], dim=1)  # word 0 repeated: a longer caption, same best regions
    longer = lambda m: alignment.local_scores(words, torch.ones(1, 3, dtype=torch.bool), REGIONS, ALL_R, m)  # noqa: E731
    assert longer("CHAN-logsumexp").item() > score("CHAN-logsumexp").item()
    assert longer("LSE-norm").item() == pytest.approx(
        math.log((2 * math.exp(10.0) + math.exp(8.0)) / 3) / 10, rel=1e-5)


def test_padded_region_never_wins_a_max():
    regions = torch.cat([REGIONS, torch.tensor([[[0.0, 5.0]]])], dim=1)  # a huge padded region
    rm = torch.tensor([[True, True, True, False]])
    got = alignment.local_scores(WORDS, ALL, regions, rm, "MrSw")
    assert got.item() == pytest.approx(1.8)


def test_padded_words_add_nothing():
    words = torch.cat([WORDS, torch.tensor([[[0.6, 0.8]]])], dim=1)
    wm = torch.tensor([[True, True, False]])
    for method, expected in [("MrSw", 1.8), ("MrAVGw", 0.9), ("MwSr", 1.8)]:
        got = alignment.local_scores(words, wm, REGIONS, ALL_R, method)
        assert got.item() == pytest.approx(expected), method


def test_empty_text_scores_zero_not_nan():
    got = score("LSE-norm", wm=torch.zeros(1, 2, dtype=torch.bool))
    assert got.item() == 0.0
    assert score("MrSw", wm=torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0


def test_fuse_is_global_plus_weighted_local():
    assert alignment.fuse(torch.tensor(0.5), torch.tensor(2.0), 0.25).item() == pytest.approx(1.0)


def _random(n, t, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, t, d, generator=g), dim=-1)
    mask = torch.rand(n, t, generator=g) > 0.3
    mask[:, 0] = True
    return x * mask[..., None], mask


@pytest.mark.parametrize("method", sorted(alignment.ALIGNMENT_FUNCTIONS))
def test_matrix_equals_one_query_at_a_time_and_chunking(method):
    words, wm = _random(7, 5, 8, 0)
    regions, rm = _random(4, 6, 8, 1)
    full = alignment.local_scores(words, wm, regions, rm, method)
    chunked = alignment.local_scores(words, wm, regions, rm, method, max_block=50)
    assert full.shape == (7, 4)
    torch.testing.assert_close(full, chunked)
    for i in range(7):  # 1 query x K candidates gives the same row
        row = alignment.local_scores(words[i : i + 1], wm[i : i + 1], regions, rm, method)
        torch.testing.assert_close(row[0], full[i])


def test_word_groundings_pick_best_region_per_word():
    index, sims, _ = alignment.whole_word_groundings(WORDS[0], REGIONS[0], ALL_R[0], [(0,), (1,)])
    assert index.tolist() == [1, 0]
    torch.testing.assert_close(sims, torch.tensor([1.0, 0.8]))


def test_unknown_alignment_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown alignment"):
        score("nope")
