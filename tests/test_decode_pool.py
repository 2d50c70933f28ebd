"""Image decoding in worker processes: the same pixels and vectors as decoding in the encoder's process."""

from __future__ import annotations

import multiprocessing
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from alignsearch.indexer.encode import decode_pool, encode_task
from alignsearch.indexer.plan import image_tasks
from alignsearch.indexer.reader import DecodePool, list_images
from alignsearch.models import load_model
from alignsearch.models.preprocess import ImagePreprocessor, load_image

from conftest import sample_files


@pytest.fixture(scope="module")
def model():
    return load_model(device="cpu")


def _formula(pre: ImagePreprocessor, pixels: np.ndarray) -> np.ndarray:
    """``(v / 255 - mean) / std`` in float32, channel first: what preprocessing must give bit for bit."""
    return ((pixels.astype(np.float32) / 255.0 - pre.mean) / pre.std).transpose(0, 3, 1, 2)


def test_normalise_of_resized_equals_the_preprocessor_bit_for_bit(photos):
    """The build's path (uint8 from the decode processes, normalised in the encoder's process) gives what the
    preprocessor gives for the same photos, and the formula's values."""
    pre = ImagePreprocessor(224, (0.48, 0.45, 0.40), (0.26, 0.26, 0.27))
    images = [load_image(p) for p in sample_files(photos[0])[:4]]
    resized = np.stack([pre.resize(im) for im in images])
    batch = pre.normalize_tensor(resized)
    assert batch.dtype == torch.float32 and batch.shape == (4, 3, 224, 224)
    assert torch.equal(batch, pre(images))
    assert np.array_equal(batch.numpy(), _formula(pre, resized))


def test_normalize_tensor_gives_the_formula_for_every_level():
    """All 256 levels of every channel, bit for bit."""
    pre = ImagePreprocessor(16, (0.48, 0.45, 0.40), (0.26, 0.26, 0.27))
    levels = np.arange(256, dtype=np.uint8)
    pixels = np.stack([np.roll(levels, shift) for shift in (0, 85, 170)], -1).reshape(1, 16, 16, 3)
    got = pre.normalize_tensor(pixels)
    assert got.dtype == torch.float32 and got.shape == (1, 3, 16, 16) and got.is_contiguous()
    assert np.array_equal(got.numpy(), _formula(pre, pixels))


def test_pool_decodes_in_other_processes_in_order_with_errors(photos):
    images = photos[0]
    files = list_images(images)
    before = {p.pid for p in multiprocessing.active_children()}  # e.g. the shared pools of earlier builds
    pool = DecodePool(2, ImagePreprocessor(32, (0.5,) * 3, (0.5,) * 3))
    try:
        batches = [files[i : i + 3] for i in range(0, len(files), 3)]
        got = [d for batch in pool.batches(images, batches) for d in batch]
        in_turns = [d for batch in pool.batches(images, batches, turns=2) for d in batch]
        assert [(d.rel, d.error, None if d.array is None else d.array.tobytes()) for d in in_turns] == \
            [(d.rel, d.error, None if d.array is None else d.array.tobytes()) for d in got]
        workers = [w for w in multiprocessing.active_children() if w.pid not in before]
        assert workers and all(w.pid != os.getpid() for w in workers)
        for w in workers:  # a decode process loads Pillow and numpy, not torch (its start competes with the encoder)
            maps = open(f"/proc/{w.pid}/maps").read() if os.path.exists(f"/proc/{w.pid}/maps") else ""
            assert "libtorch" not in maps
    finally:
        pool.close()
    assert [d.rel for d in got] == files
    broken = {d.rel for d in got if d.error}
    assert broken == {"garbage.jpg", "empty.png", "truncated.jpg"}
    for d in got:
        if d.error is None:
            assert d.array.dtype == np.uint8 and d.array.shape == (32, 32, 3)
            with Image.open(images / d.rel) as im:
                assert (d.width, d.height) == im.size
    assert {p.pid for p in multiprocessing.active_children()} <= before  # close() stopped them


def test_in_turns_decodes_a_chunk_whole_and_the_next_only_when_asked():
    """Turns: the consumer gets a chunk's first batch only when the whole chunk is decoded, and nothing of the
    next chunk is submitted while it works on this one."""
    from concurrent.futures import ThreadPoolExecutor

    from alignsearch.indexer.reader import Decoded, _in_turns

    submitted: list[str] = []

    def submit(batch):
        submitted.extend(batch)
        return [pool.submit(Decoded, rel) for rel in batch]

    with ThreadPoolExecutor(2) as pool:
        turns = _in_turns([["a", "b"], ["c"], ["d", "e"], ["f"], ["g"]], submit, lambda fs: [f.result() for f in fs],
                          chunk=2)
        assert [d.rel for d in next(turns)] == ["a", "b"]
        assert submitted == ["a", "b", "c"]  # the whole first chunk, nothing of the second
        assert [d.rel for d in next(turns)] == ["c"] and len(submitted) == 3
        assert [d.rel for d in next(turns)] == ["d", "e"] and submitted[3:] == ["d", "e", "f"]
        assert [[d.rel for d in b] for b in turns] == [["f"], ["g"]]


def test_builds_of_one_process_share_a_pool_that_survives_a_dead_worker(photos):
    from types import SimpleNamespace

    images = photos[0]
    files = [f for f in list_images(images) if f.endswith(".jpg")][:4]
    pre = ImagePreprocessor(32, (0.5,) * 3, (0.5,) * 3)
    model = SimpleNamespace(image_preprocessor=pre)
    pool = decode_pool(model, 2)
    assert decode_pool(SimpleNamespace(image_preprocessor=pre), 2) is pool  # the next build: no new processes
    assert decode_pool(model, 1) is not pool
    assert decode_pool(SimpleNamespace(image_preprocessor=None), 2) is None
    first = [d.rel for batch in pool.batches(images, [files]) for d in batch]
    victim = next(iter(pool._pool()._processes.values()))
    victim.kill()
    victim.join()
    deadline = time.monotonic() + 10
    while not pool._executor._broken and time.monotonic() < deadline:
        time.sleep(0.05)  # the executor notices the dead worker and marks itself broken
    again = [d.rel for batch in pool.batches(images, [files]) for d in batch]  # a fresh set of processes
    assert first == again == files


@pytest.mark.slow
def test_encode_task_with_the_pool_equals_threads(photos, model):
    images = photos[0]
    files = [f for f in list_images(images) if not f.startswith(("garbage", "empty", "truncated"))][:5]
    task = image_tasks(files, str(images), str(images), 64)[0]
    pool = decode_pool(model, 1)
    try:
        pooled = encode_task(model, task, batch_size=2, pool=pool)
    finally:
        pool.close()
    threaded = encode_task(model, task, batch_size=2)
    assert [i["id"] for i in pooled.items] == [i["id"] for i in threaded.items] == files
    assert np.array_equal(np.asarray(pooled.global_vectors), np.asarray(threaded.global_vectors))
    assert np.array_equal(np.asarray(pooled.local_vectors), np.asarray(threaded.local_vectors))


def test_decode_processes_end_when_the_process_that_started_them_is_killed(photos):
    import signal
    import subprocess
    import sys

    code = f"""
import multiprocessing, sys, time
from pathlib import Path
from alignsearch.indexer.reader import DecodePool, list_images
from alignsearch.models.preprocess import ImagePreprocessor
if __name__ == "__main__":
    folder = Path({str(photos[0])!r})
    pool = DecodePool(2, ImagePreprocessor(32, (0.5,) * 3, (0.5,) * 3))
    files = list_images(folder)
    list(pool.batches(folder, [files[:3]]))
    print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              stderr=subprocess.DEVNULL)
    try:
        children = [int(pid) for pid in parent.stdout.readline().split()]
    finally:
        parent.send_signal(signal.SIGKILL)  # no clean-up of any kind runs in the parent
        parent.wait(10)
    assert children
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") and "zombie" not in _state(pid) for pid in children):
        assert time.monotonic() < deadline, "decode processes outlived the process that started them"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/status").read().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"  # gone between the two looks
