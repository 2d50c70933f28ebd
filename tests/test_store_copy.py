"""An update copies the previous codes into the new store: by the kernel from a file, in chunks otherwise."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from alignsearch.indexer import local_store

DIM, REGIONS = 16, 7


def _store(folder, items: int, seed: int, previous=None) -> tuple[local_store.LocalStore, np.ndarray]:
    """A real SQ8 store of ``items`` random items after ``previous``'s; returns it and the new items' codes."""
    rng = np.random.default_rng(seed)
    codec = previous.codec if previous is not None else local_store.make_codec(
        DIM, "SQ8", rng.standard_normal((512, DIM)).astype(np.float32))
    codes = rng.integers(0, 256, (items * REGIONS, DIM), dtype=np.uint8)
    local_store.write_store_streaming(folder, codec, [codes], np.full(items, REGIONS), previous=previous,
                                      encoded=True)
    return local_store.LocalStore.open(folder), codes


@pytest.mark.parametrize("how", ["kernel", "kernel refuses", "in memory"])
def test_an_update_keeps_the_previous_codes_byte_for_byte_then_the_new_ones(tmp_path, monkeypatch, how):
    first, old_codes = _store(tmp_path / "v1", 300, 0)
    calls = []
    if how == "kernel refuses":  # e.g. EXDEV on an old kernel: the chunked copy takes over
        def refuse(*args):
            calls.append(args)
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    elif how == "kernel":
        real = os.copy_file_range
        monkeypatch.setattr(os, "copy_file_range", lambda *args: calls.append(args) or real(*args))
    else:
        first = local_store.LocalStore(first.codec, np.array(first.codes), first.offsets)
    second, new_codes = _store(tmp_path / "v2", 40, 1, previous=first)
    assert np.array_equal(np.asarray(second.codes), np.concatenate([old_codes, new_codes]))
    assert np.array_equal(second.offsets, np.arange(341) * REGIONS)
    assert bool(calls) == (how != "in memory")
    assert [p.name for p in (tmp_path / "v2").iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_a_full_disk_during_the_kernel_copy_is_not_retried_in_chunks(tmp_path, monkeypatch):
    first, _ = _store(tmp_path / "v1", 50, 0)
    monkeypatch.setattr(os, "copy_file_range", lambda *args: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError) as raised:  # a retry in chunks would have succeeded here, the disk is not full
        _store(tmp_path / "v2", 5, 1, previous=first)
    assert raised.value.errno == errno.ENOSPC
    assert not (tmp_path / "v2" / local_store.CODES_FILE).exists()
