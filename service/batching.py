"""Dynamic micro-batching: concurrent requests share one encoder forward pass.

Requests queue up; a worker takes the first, waits at most ``max_wait_ms`` for more (up to ``max_batch``),
and runs the batch on ``executor``'s thread (:mod:`service.compute`) so the event loop stays free. While a
batch runs, new requests queue and form the next one, so under load batches grow by themselves and at low load a
request waits at most the bound. At most ``max_queue`` requests wait (beyond the batch that runs); one more is
refused with :class:`QueueFull` at once instead of waiting behind all of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")



async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel a background task (if any) and wait until it has stopped."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass

class QueueFull(RuntimeError):
    """The batcher already has ``max_queue`` requests waiting."""


class MicroBatcher(Generic[T, R]):
    def __init__(self, process: Callable[[list[T]], list[R]], max_batch: int = 16, max_wait_ms: float = 5.0,
                 observe: Callable[[int], None] | None = None, max_queue: int | None = None,
                 executor: Executor | None = None) -> None:
        """``executor`` runs the batches (None: asyncio's default pool of threads)."""
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_queue is not None and max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.process = process
        self.executor = executor
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_wait = max_wait_ms / 1000.0
        self.observe = observe
        self.batches = 0
        self.items = 0
        self.largest = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def submit(self, item: T) -> R:
        """Queue ``item``; returns its result once its batch has run (or raises the batch's error).
        Raises :class:`QueueFull` at once when ``max_queue`` requests are already waiting."""
        if self._queue is None:
            raise RuntimeError("batcher not started")
        if self.max_queue is not None and self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} requests are already waiting")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _collect(self) -> list[tuple[T, asyncio.Future]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            live = [(item, fut) for item, fut in batch if not fut.cancelled()]
            if not live:
                continue
            self.batches += 1
            self.items += len(live)
            self.largest = max(self.largest, len(live))
            if self.observe:
                self.observe(len(live))
            try:
                results = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.process, [item for item, _ in live])
            except Exception as exc:  # the batch failed: each caller gets the error
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(live, results):
                if not fut.done():
                    fut.set_result(result)

    @property
    def waiting(self) -> int:
        """Requests queued and not yet in a batch."""
        return self._queue.qsize() if self._queue is not None else 0

    def stats(self) -> dict[str, float]:
        return {"batches": self.batches, "items": self.items, "largest": self.largest,
                "mean": round(self.items / self.batches, 3) if self.batches else 0.0}
