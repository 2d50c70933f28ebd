"""The bench's page-cache and process helpers against the real kernel."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

from alignsearch.bench import pagecache


def test_drop_evicts_a_written_file_and_reading_it_brings_it_back(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes())
    assert pagecache.cached_fraction(path) > 0.9  # just written: in the cache
    assert pagecache.drop([path]) == 8 << 20
    assert pagecache.cached_fraction(path) < 0.05
    path.read_bytes()
    assert pagecache.cached_fraction(path) > 0.9


def test_pages_a_process_maps_stay_cached_until_unmapped(tmp_path):
    path = tmp_path / "codes.npy"
    np.save(path, np.random.default_rng(0).integers(0, 255, (8 << 10, 1 << 10), dtype=np.uint8))
    codes = np.load(path, mmap_mode="r")
    assert int(codes.sum(dtype=np.int64)) > 0  # every page read through the map
    pagecache.drop([path])
    assert pagecache.cached_fraction(path) > 0.9  # mapped pages are not evicted: a "cold" timing would be warm
    pagecache.unmap([codes, np.zeros(3)])  # arrays in memory are passed over
    pagecache.drop([path])
    assert pagecache.cached_fraction(path) < 0.05
    assert int(codes[-1].sum(dtype=np.int64)) == int(np.load(path)[-1].sum(dtype=np.int64))  # still readable
    assert pagecache.resident_pages(path).sum() >= 1 and len(pagecache.resident_pages(path)) == 2049


def test_load_memory_children_and_rss():
    assert len(pagecache.load()) == 3 and all(x >= 0 for x in pagecache.load())
    assert 0 < pagecache.available_memory()
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(50 << 20); time.sleep(30)"])
    try:
        for _ in range(100):
            rss = pagecache.rss_bytes(child.pid)
            if rss["VmRSS"] > 50 << 20:
                break
            time.sleep(0.05)
        assert child.pid in pagecache.children()
        assert rss["VmRSS"] > rss["RssAnon"] > 50 << 20
    finally:
        child.kill()
        child.wait()
