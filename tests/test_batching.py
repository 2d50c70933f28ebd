"""The micro-batcher on its own: batching under concurrency, the wait bound, and error propagation."""

import asyncio
import time

import pytest

from alignsearch.service.batching import MicroBatcher, QueueFull


def test_concurrent_submissions_share_batches_and_keep_order():
    seen: list[int] = []

    def process(items):
        seen.append(len(items))
        time.sleep(0.02)
        return [i * 10 for i in items]

    async def run():
        batcher = MicroBatcher(process, max_batch=8, max_wait_ms=20)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
        await batcher.stop()
        return results, batcher.stats()

    results, stats = asyncio.run(run())
    assert results == [i * 10 for i in range(20)]
    assert max(seen) > 1 and max(seen) <= 8 and sum(seen) == 20
    assert stats["largest"] == max(seen) and stats["items"] == 20


def test_max_batch_one_disables_batching():
    sizes: list[int] = []

    async def run():
        batcher = MicroBatcher(lambda items: sizes.append(len(items)) or items, max_batch=1, max_wait_ms=20)
        await batcher.start()
        await asyncio.gather(*(batcher.submit(i) for i in range(5)))
        await batcher.stop()

    asyncio.run(run())
    assert sizes == [1] * 5


def test_a_failing_batch_raises_in_every_caller_and_the_worker_survives():
    calls = {"n": 0}

    def process(items):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("boom")
        return items

    async def run():
        batcher = MicroBatcher(process, max_batch=4, max_wait_ms=10)
        await batcher.start()
        first = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        second = await batcher.submit(7)
        await batcher.stop()
        return first, second

    first, second = asyncio.run(run())
    assert all(isinstance(r, ValueError) for r in first)
    assert second == 7


def test_invalid_batch_size():
    with pytest.raises(ValueError):
        MicroBatcher(lambda x: x, max_batch=0)


def test_a_full_queue_refuses_at_once_and_the_waiting_ones_still_run():
    release = None

    def process(items):
        release.wait(5)
        return items

    async def run():
        nonlocal release
        import threading

        release = threading.Event()
        batcher = MicroBatcher(process, max_batch=1, max_wait_ms=1, max_queue=2)
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)  # item 0 is in its batch; the queue is empty
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(QueueFull):
            await batcher.submit(3)
        refused_in = time.perf_counter() - started
        release.set()
        results = await asyncio.gather(running, *waiting)
        await batcher.stop()
        return results, refused_in

    results, refused_in = asyncio.run(run())
    assert results == [0, 1, 2] and refused_in < 0.05
