"""Cold reads of the local store: a gather asks for its candidates' pages at once, and reads nothing else.

Against the real kernel's page cache (``posix_fadvise`` to evict, ``mincore`` to look): a page fault on a memory
map reads ahead a whole window around the page (8 MB on the CI machine's disk), so a cold gather that faulted
item by item read megabytes per candidate.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from alignsearch.bench import pagecache
from alignsearch.indexer import local_store
from alignsearch.indexer.layout import CODES_FILE
from alignsearch.indexer.rerank import gather

ITEMS, REGIONS, DIM = 2_000, 49, 64  # SQ8: 64 bytes per vector, 3,136 per item, 6.3 MB in all
PAGE = pagecache.PAGE


@pytest.fixture()
def cold_store(tmp_path):
    """A real SQ8 store on disk, its codes evicted from the page cache."""
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((4_096, DIM)).astype(np.float32)
    codec = local_store.make_codec(DIM, "SQ8", sample)
    codes = rng.integers(0, 256, (ITEMS * REGIONS, DIM), dtype=np.uint8)
    local_store.write_store(tmp_path, codec, codes, np.full(ITEMS, REGIONS))
    path = tmp_path / CODES_FILE
    pagecache.drop([path])
    if pagecache.cached_fraction(path) > 0.05:
        pytest.skip("this file system keeps the file in memory after POSIX_FADV_DONTNEED (tmpfs?)")
    return local_store.LocalStore.open(tmp_path), path, codes


def _pages_of(store: local_store.LocalStore, rows: np.ndarray) -> set[int]:
    header = store.codes.offset
    size = store.codes.shape[1]
    pages: set[int] = set()
    for row in rows:
        start, end = header + store.offsets[row] * size, header + store.offsets[row + 1] * size
        pages.update(range(start // PAGE, (end - 1) // PAGE + 1))
    return pages


def _resident_after(path, wanted: set[int], seconds: float = 5.0) -> set[int]:
    """The resident pages, once ``wanted`` are all in (the reads a hint starts finish in the background)."""
    deadline = time.monotonic() + seconds
    while True:
        resident = set(np.flatnonzero(pagecache.resident_pages(path)).tolist())
        if wanted <= resident or time.monotonic() > deadline:
            return resident
        time.sleep(0.01)


def test_merged_ranges_sorts_and_joins_overlapping_and_touching_ranges():
    starts = np.array([40, 0, 10, 100, 12, 0])
    ends = np.array([50, 10, 20, 110, 15, 5])
    assert local_store.merged_ranges(starts, ends) == [(0, 20), (40, 50), (100, 110)]
    assert local_store.merged_ranges(np.array([7]), np.array([9])) == [(7, 9)]
    assert local_store.merged_ranges(np.array([0, 30]), np.array([10, 40])) == [(0, 10), (30, 40)]  # sorted input
    assert local_store.merged_ranges(np.zeros(0, np.int64), np.zeros(0, np.int64)) == []


def test_prefetch_reads_exactly_the_pages_of_the_rows_asked_for(cold_store):
    store, path, _ = cold_store
    rows = np.array([1_500, 3, 700, 701, 1_999])
    wanted = _pages_of(store, rows)
    store.prefetch(rows)
    resident = _resident_after(path, wanted)
    assert wanted <= resident
    assert len(resident - wanted) <= 2  # at most the file's header page and a stray neighbour, no read-ahead window
    assert not _pages_of(store, np.array([1_000, 1_200])) & resident


def test_a_cold_rerank_gather_reads_only_its_candidates_pages_and_returns_their_codes(cold_store):
    store, path, codes = cold_store
    rows = np.sort(np.random.default_rng(1).choice(ITEMS, 20, replace=False))
    gathered = gather(store, rows, torch.device("cpu"))
    resident = set(np.flatnonzero(pagecache.resident_pages(path)).tolist())
    wanted = _pages_of(store, rows)
    assert wanted <= resident
    # a fault per item would have read a read-ahead window (32 pages or more) around each of the 20 candidates
    assert len(resident) <= len(wanted) + 20
    expected = store.decode(codes.reshape(ITEMS, -1)[rows].reshape(-1, DIM)).view(len(rows), REGIONS, DIM)
    assert torch.equal(gathered.tokens, expected)


def test_a_store_in_memory_has_nothing_to_prefetch():
    rng = np.random.default_rng(0)
    codec = local_store.make_codec(DIM, "SQ8", rng.standard_normal((512, DIM)).astype(np.float32))
    store = local_store.LocalStore(codec, np.zeros((10 * REGIONS, DIM), np.uint8), np.arange(11) * REGIONS)
    store.prefetch(np.array([2, 3]))  # no memory map: a no-op, not an error
    tokens, mask = store.gather(np.array([2, 3]))
    assert tokens.shape == (2, REGIONS, DIM) and bool(mask.all())


def test_only_ranges_with_a_page_outside_the_cache_are_asked_for(cold_store):
    """A warm batch makes no ``madvise`` call at all (one per range cost ~10% of a warm rerank); a cold one asks
    for exactly its cold ranges."""
    store, path, _ = cold_store
    read, unread = np.array([10, 500, 1_200]), np.array([50, 900, 1_900])
    both = np.sort(np.concatenate([read, unread]))
    assert len(store.page_ranges(both)) == 6
    assert store.cold_page_ranges(both) == store.page_ranges(both)  # all cold
    store.gather(read)
    _resident_after(path, _pages_of(store, read))
    assert store.cold_page_ranges(both) == store.page_ranges(unread)
    store.gather(unread)
    _resident_after(path, _pages_of(store, both))
    assert store.cold_page_ranges(both) == []


def test_where_residency_cannot_be_asked_every_range_is_prefetched(cold_store, monkeypatch):
    store, _, _ = cold_store
    rows = np.array([3, 4, 1_000])
    monkeypatch.setattr(local_store, "MINCORE_MAX_PAGES", 1)  # a span too wide to ask about
    assert store.cold_page_ranges(rows) == store.page_ranges(rows)
    monkeypatch.setattr(local_store, "resident", lambda address, length: None)  # no mincore here
    monkeypatch.setattr(local_store, "MINCORE_MAX_PAGES", 1 << 20)
    assert store.cold_page_ranges(rows) == store.page_ranges(rows)
