"""The threads that run the model and the search in the server.

torch runs its CPU kernels in OpenMP thread teams, one team for each thread that calls it. Once a second thread
has run torch's kernels too, every small kernel of every thread is slow for the life of the process: on the
2-core CI machine a text query's encoding takes 5.0 ms while one thread calls torch, and 12 ms in every thread
after a second one has (measured; the likely cause: the encoder is hundreds of small parallel regions, and GNU
OpenMP's threads, more than the cores once there are two teams, stop spinning between them; forcing a short spin
with ``GOMP_SPINCOUNT=1000`` alone makes one thread's encoding 9.5 ms). The server used to run each batch on
whichever of asyncio's pool threads was free, after loading the model on the main thread. So it now calls torch
from two threads of its own:

- the **light** thread, with torch's full thread count: loading the model and every light batch (text and image);
- the **heavy** thread, with one torch thread (so no team of its own): the heavy lanes' batches, which run beside
  the light ones as before (a heavy search never holds up a light one) and never take more than one core.

Both are daemon threads, so Ctrl-C stops a server that is still loading without waiting for the load.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import torch

T = TypeVar("T")
POLL_S = 0.1
INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (alignsearch.console)


class DaemonThreadExecutor(Executor):
    """An executor of one daemon thread: calls run in the order submitted, all on the same thread."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self._closed:
            raise RuntimeError("cannot submit to an executor that was shut down")
        future: Future[T] = Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Call ``fn`` on the thread and wait for its result (or its exception); for a command's main thread.

        Ctrl-C while ``fn`` runs ends the process at once with status 130: the thread cannot be stopped, and the
        interpreter's shutdown would end it inside torch's C++ code, which aborts the process. What ``fn`` was
        doing is left as a crash leaves it (an index build resumes; the live index is never half-written). The
        wait wakes up every :data:`POLL_S`, since the kernel may hand Ctrl-C to the busy thread."""
        future = self.submit(fn, *args, **kwargs)
        try:
            while True:
                try:
                    return future.result(timeout=POLL_S)
                except FutureTimeout:
                    continue
        except KeyboardInterrupt:
            if future.done():
                raise
            print("interrupted", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(INTERRUPTED)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        while cancel_futures:  # the calls not yet started are cancelled, as ThreadPoolExecutor does
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                break
            if call is not None:
                call[0].cancel()
        self._calls.put(None)
        if wait:
            self.thread.join()

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args, kwargs = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001  (handed to the caller, as ThreadPoolExecutor does)
                future.set_exception(exc)


class ComputeThreads:
    """The light and the heavy thread (see the module's docstring)."""

    def __init__(self) -> None:
        self.light = DaemonThreadExecutor("alignsearch-light")
        threads = self.light.run(torch.get_num_threads)  # the light thread's count is fixed from here on
        self.heavy = DaemonThreadExecutor("alignsearch-heavy")
        self.heavy.run(_one_torch_thread)
        # set_num_threads also sets the default of threads that have not called torch yet: give it back
        self.light.run(torch.set_num_threads, threads)


def _one_torch_thread() -> None:
    torch.get_num_threads()  # torch sets a thread's count from the default on its first call: let it, then set 1
    torch.set_num_threads(1)


def lower_this_thread(nice: int) -> bool:
    """Make the calling thread at least ``nice`` steps nicer than the process's main thread (Linux: nice is per
    thread, and threads it starts later, such as torch's OpenMP team, inherit it; calling again changes nothing);
    False where the platform cannot (nothing changes)."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + nice)
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except OSError:
        return False
    return True


_shared: ComputeThreads | None = None
_shared_lock = threading.Lock()


def compute_threads() -> ComputeThreads:
    """The process's compute threads, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ComputeThreads()
        return _shared
