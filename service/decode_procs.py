"""Image decodes in worker processes that are killed and replaced when they pass their time limit.

A decode inside Pillow cannot be interrupted; in a thread it would run on after its request got its 503 and
keep its slot (a few crafted uploads held every slot for minutes). Here each slot runs its decodes in a
process of its own (``spawn``: it loads Pillow and :mod:`service.image_decode`, nothing of the server), fed
through a pipe; a decode still running at its deadline has its process killed (SIGKILL) at that moment, so
the slot is free when the 503 is sent, and a fresh process is started in the background for the next one. A
decode process ends by itself when the server is gone (its pipe closes).

At most ``workers`` decodes run at once, with ``queue`` more waiting; beyond that the answer is at once
:class:`DecodeBusy`. A request's deadline counts from its arrival (waiting included).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Callable

from PIL import Image

from .image_decode import DecodeRefused, ImageLimits

DecodeFn = Callable[[bytes, ImageLimits], Image.Image]
log = logging.getLogger("alignsearch.service")
KILL_WAIT_S = 1.0
START_TIMEOUT_S = 60.0
LATE_GRACE_S = 0.25  # past the deadline, the 503 goes out even if the decode thread has not answered


class DecodeBusy(Exception):
    """Every slot and queue place is taken (or no decode process could be started)."""


class DecodeTimeout(Exception):
    """The decode passed its deadline (its process was killed)."""


def _serve(conn: Connection, decode: DecodeFn, limits: ImageLimits, nice: int = 0) -> None:
    """A decode process: ``nice`` steps nicer, warms up, says it is ready, then one upload in, one answer out,
    until the pipe closes."""
    if nice > 0:
        try:
            os.nice(nice)
        except OSError:  # a platform without nice: the same priority as the server
            pass
    _warm_up(decode, limits)
    conn.send(("ready",))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            image = decode(data, limits)
            answer: tuple = ("ok", image.mode, image.size, image.tobytes())
        except DecodeRefused as exc:
            answer = ("refused", exc.status, exc.detail)
        except Exception:  # noqa: BLE001  (a decoder failing in a way of its own)
            answer = ("refused", 415, "the image could not be decoded")
        try:
            conn.send(answer)
        except (EOFError, OSError):
            return


def _warm_up(decode: DecodeFn, limits: ImageLimits) -> None:
    """Load Pillow's plugins and decoders now, not on the first upload."""
    import io

    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format=fmt)
        try:
            decode(buf.getvalue(), limits)
        except Exception:  # noqa: BLE001  (a warm-up only)
            pass


class _Worker:
    """One decode process and the parent's end of its pipe."""

    def __init__(self, decode: DecodeFn, limits: ImageLimits, nice: int = 0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, decode, limits, nice), name="alignsearch-decode",
                                   daemon=True)
        self.process.start()
        child.close()
        started = time.monotonic()
        try:  # ready once Pillow is imported: an idle process answers at once
            ready = self.conn.poll(START_TIMEOUT_S) and self.conn.recv() == ("ready",)
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError(f"a decode process did not start within {START_TIMEOUT_S:g} s")
        self.start_s = time.monotonic() - started
        self.overrun_s: float | None = None  # set when killed at a deadline: seconds from it to the process gone

    def call(self, data: bytes, deadline: float) -> Image.Image:
        """Decode ``data``; :class:`DecodeTimeout` (the process killed) when no answer came by ``deadline``."""
        if time.monotonic() >= deadline:  # late before it began (a process was being started): kept
            raise DecodeTimeout
        try:
            self.conn.send_bytes(data)
            if not self.conn.poll(max(0.0, deadline - time.monotonic())):
                raise DecodeTimeout
            answer = self.conn.recv()
        except (EOFError, OSError):  # the process died (killed for memory, a crash in a decoder)
            self.kill()
            raise DecodeRefused(415, "the image could not be decoded") from None
        except DecodeTimeout:
            self.kill()
            if not self.process.is_alive():
                self.overrun_s = time.monotonic() - deadline
            raise
        if answer[0] == "refused":
            raise DecodeRefused(answer[1], answer[2])
        _, mode, size, pixels = answer
        return Image.frombytes(mode, size, pixels)

    @property
    def alive(self) -> bool:
        return self.process.is_alive() and not self.conn.closed

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(KILL_WAIT_S)
        self.conn.close()


class ProcessDecoder:
    """``workers`` decode processes, ``queue`` more requests waiting, a deadline per request."""

    def __init__(self, decode: DecodeFn, limits: ImageLimits, workers: int = 2, queue: int = 8,
                 timeout_s: float = 10.0, prestart: bool = True, nice: int = 0) -> None:
        if workers < 1:
            raise ValueError("decode workers must be >= 1")
        self.decode_fn, self.limits, self.nice = decode, limits, nice
        self.workers, self.capacity, self.timeout_s = workers, workers + max(0, queue), timeout_s
        self.busy = 0  # requests admitted and not finished
        self.killed = 0  # processes killed at their deadline (or found dead)
        # the longest time from a decode's deadline until its killed process was gone (measured here, by the
        # thread that killed it: the figure behind "no decode outlives its limit by more than 1 s")
        self.max_overrun_s = 0.0
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._slots: asyncio.Semaphore | None = None
        self._threads = ThreadPoolExecutor(2 * workers, thread_name_prefix="alignsearch-decode")
        self._closed = False
        if prestart:
            for _ in range(workers):
                self._threads.submit(self._spare)

    def _start(self) -> _Worker:
        worker = _Worker(self.decode_fn, self.limits, self.nice)
        with self._lock:
            self._all.add(worker)
            if self._closed:
                self._all.discard(worker)
                worker.kill()
        return worker

    def _spare(self) -> None:
        """Start a process and leave it idle (after a kill, or at start-up)."""
        worker = self._start()
        with self._lock:
            if not self._closed and len(self._idle) < self.workers:
                self._idle.append(worker)
                return
            self._all.discard(worker)
        worker.kill()

    def _take(self) -> _Worker:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.alive:
                    return worker
                self._all.discard(worker)
        return self._start()

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed and worker.alive and len(self._idle) < self.workers:
                self._idle.append(worker)
                return
            self._all.discard(worker)
        worker.kill()

    def _run(self, data: bytes, deadline: float) -> Image.Image:
        """On a thread: a process for this request, the decode, and the process back (or replaced)."""
        if time.monotonic() >= deadline:
            raise DecodeTimeout
        try:
            worker = self._take()
        except RuntimeError:
            raise DecodeBusy from None
        try:
            image = worker.call(data, deadline)
        except (DecodeTimeout, DecodeRefused):
            if not worker.alive:
                with self._lock:
                    self._all.discard(worker)
                    self.killed += 1
                    if worker.overrun_s is not None:
                        self.max_overrun_s = max(self.max_overrun_s, worker.overrun_s)
                if worker.overrun_s is not None:
                    log.warning("a decode passed its %g s limit: its process was killed, gone %.3f s after the "
                                "deadline", self.timeout_s, worker.overrun_s)
                if not self._closed:
                    self._threads.submit(self._spare)
            else:
                self._give_back(worker)
            raise
        self._give_back(worker)
        return image

    async def decode(self, data: bytes) -> Image.Image:
        """The decoded image; :class:`DecodeBusy` at once when full, :class:`DecodeTimeout` at the deadline,
        :class:`DecodeRefused` for an upload that is not a usable image."""
        if self.busy >= self.capacity:
            raise DecodeBusy
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.timeout_s
        self.busy += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
        except asyncio.TimeoutError:
            self.busy -= 1
            raise DecodeTimeout from None
        except BaseException:
            self.busy -= 1
            raise
        future: Future = self._threads.submit(self._run, data, deadline)

        def done(_: Future) -> None:  # on a decode thread (or here, if cancelled before it started)
            try:
                loop.call_soon_threadsafe(self._finished)
            except RuntimeError:  # the loop is closed: nothing is waiting any more
                pass

        future.add_done_callback(done)
        waited = asyncio.wrap_future(future)
        try:  # the thread kills the decode at the deadline; this bounds a wait for a process being started
            return await asyncio.wait_for(asyncio.shield(waited),
                                          max(0.0, deadline - time.monotonic()) + LATE_GRACE_S)
        except asyncio.TimeoutError:
            # answered already: the thread's outcome (a timeout of its own, most likely) is read and dropped
            waited.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise DecodeTimeout from None

    def _finished(self) -> None:
        self.busy -= 1
        assert self._slots is not None
        self._slots.release()

    def idle(self) -> int:
        """Processes started and waiting for an upload."""
        with self._lock:
            return sum(w.alive for w in self._idle)

    def pids(self) -> set[int]:
        """The decode processes now alive."""
        with self._lock:
            return {w.process.pid for w in self._all if w.process.is_alive()}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
            self._idle.clear()
        for worker in workers:
            worker.kill()
        self._threads.shutdown(wait=False, cancel_futures=True)
