"""Admission control of the search work: two lanes per query kind, bounded queues, a time limit.

A request's work is ``candidates * max(k, 10)`` (the rerank scores every candidate; ``k`` sets what is
explained and fetched; a small ``k`` is counted as 10 so that ``k=1, candidates=1000`` is not cheap). Work
over ``max_work`` is refused (422). Work over ``heavy_work`` goes to the *heavy* lane, a micro-batcher of its
own (batches of at most 2, at most ``max_heavy_queue`` waiting); the rest to the *light* lane (batches of
``max_batch``, at most ``max_queue`` waiting). The two lanes run side by side (on the server's light and heavy
threads, :mod:`service.compute`), so ordinary queries never wait behind expensive ones; a full lane answers 503
with ``Retry-After`` at once, and a request still unanswered after ``request_timeout_s`` gets 503 too (its work
is dropped if it has not started).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException

from .batching import MicroBatcher, QueueFull
from .compute import ComputeThreads
from .settings import Settings

HEAVY_BATCH = 2
RETRY_AFTER_S = 1


def work(candidates: int, k: int) -> int:
    """The cost measure that the limits compare: ``candidates * max(k, 10)``."""
    return candidates * max(k, 10)


def overloaded(detail: str) -> HTTPException:
    """A 503 that tells the client when to retry."""
    return HTTPException(503, detail, headers={"Retry-After": str(RETRY_AFTER_S)})


class Lanes:
    """A light and a heavy :class:`MicroBatcher` over the same ``process`` function."""

    def __init__(self, name: str, process: Callable[[list[Any]], list[Any]], settings: Settings,
                 observe: Callable[[int], None] | None = None, threads: ComputeThreads | None = None) -> None:
        """Each lane's batches run on its thread of ``threads`` (None: asyncio's default pool)."""
        self.name = name
        self.settings = settings
        self.light = MicroBatcher(process, settings.max_batch, settings.batch_wait_ms, observe, settings.max_queue,
                                  threads.light if threads else None)
        self.heavy = MicroBatcher(process, min(HEAVY_BATCH, settings.max_batch), settings.batch_wait_ms, observe,
                                  settings.max_heavy_queue, threads.heavy if threads else None)

    async def start(self) -> None:
        await self.light.start()
        await self.heavy.start()

    async def stop(self) -> None:
        await self.light.stop()
        await self.heavy.stop()

    def lane(self, candidates: int, k: int) -> MicroBatcher:
        """The lane this work goes to; 422 when the work is over ``max_work``, 503 when the lane is full (so a
        caller can refuse before it spends anything, such as decoding an upload)."""
        cost = work(candidates, k)
        if cost > self.settings.max_work:
            raise HTTPException(422, f"candidates x max(k, 10) = {cost} exceeds the limit of "
                                     f"{self.settings.max_work}: ask for fewer candidates or results")
        lane = self.heavy if cost > self.settings.heavy_work else self.light
        if lane.max_queue is not None and lane.waiting >= lane.max_queue:
            raise self._busy(lane)
        return lane

    def _busy(self, lane: MicroBatcher) -> HTTPException:
        kind = "expensive " if lane is self.heavy else ""
        return overloaded(f"the server is busy with {kind}{self.name} searches; retry shortly")

    async def run(self, item: Any, candidates: int, k: int) -> Any:
        """The result of ``item``, from the lane its work belongs to; 503 when the lane is full or the
        request passes the time limit."""
        lane = self.lane(candidates, k)
        try:
            return await asyncio.wait_for(lane.submit(item), self.settings.request_timeout_s)
        except QueueFull:
            raise self._busy(lane) from None
        except asyncio.TimeoutError:
            raise overloaded(f"the search took longer than {self.settings.request_timeout_s:g} s") from None
