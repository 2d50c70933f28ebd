"""Several server processes on one listening socket: ``alignsearch serve --workers N``.

The parent binds the address (:func:`service.serve.bind`), listens, and starts ``N`` worker processes (spawned:
a fresh interpreter each, so no torch thread pool or lock is inherited half-way). Each worker loads the model
and opens the index itself; the index's stores and FAISS file are memory-mapped, so the page cache holds one
copy of them for every worker (each process keeps its own model, a few hundred MB). All workers accept on the
same socket: the kernel gives each new connection to one of them. A worker whose parent is gone (SIGKILL, the
OOM killer) stops by itself within a second instead of serving the port on its own.

Admission control stays bounded for the server as a whole by splitting it: each worker admits its share of
the queues, ``ceil(max_queue / N)`` light and ``ceil(max_heavy_queue / N)`` heavy searches waiting
(:func:`worker_settings`), so N workers hold about as many waiting searches as one process would. A worker
that exits ends the server: the others are stopped and the parent exits with that worker's status.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

from .settings import Settings

BACKLOG = 2048  # uvicorn's default
STOP_TIMEOUT_S = 20.0
POLL_S = 0.2
PARENT_POLL_S = 0.5  # how often a worker looks whether its parent is still there


def worker_settings(settings: Settings, workers: int) -> Settings:
    """One worker's settings: its share of the admission queues (rounded up, at least 1)."""
    if workers < 1:
        raise ValueError("--workers must be >= 1")
    return dataclasses.replace(settings, max_queue=max(1, math.ceil(settings.max_queue / workers)),
                               max_heavy_queue=max(1, math.ceil(settings.max_heavy_queue / workers)))


def _exit_with_parent(parent: int) -> None:
    """Stop this worker once ``parent`` is gone (it was re-parented): uvicorn's graceful stop by SIGTERM, then,
    if that has not ended it within ``STOP_TIMEOUT_S``, an exit."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_TIMEOUT_S)
    os._exit(1)


def _entry(target: Callable[..., None], sock: socket.socket, ready: Any, args: tuple, parent: int) -> None:
    """A worker process: ``target(sock, announce, *args)``, where ``announce(info)`` tells the parent it is ready;
    it ends when its ``parent`` process does."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watch", daemon=True).start()
    target(sock, lambda info=None: ready.put((os.getpid(), info)), *args)


def run_workers(sock: socket.socket, workers: int, target: Callable[..., None], args: tuple = (),
                on_ready: Callable[[list[Any]], None] | None = None) -> int:
    """Run ``workers`` processes of ``target(sock, announce, *args)`` (a module-level function: it is pickled)
    on the bound ``sock``; ``on_ready(infos)`` once every worker has announced itself. Returns when one worker
    exits (the others are stopped), or after SIGINT / SIGTERM stopped them all: the exit status."""
    sock.listen(BACKLOG)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(target, sock, ready, args, os.getpid()),
                         name=f"alignsearch-worker-{i + 1}")
             for i in range(workers)]
    stopping = False

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        infos: list[Any] = []
        while not (ended := wait([p.sentinel for p in procs], timeout=POLL_S)):
            while len(infos) < workers:
                try:
                    infos.append(ready.get_nowait()[1])
                except queue.Empty:
                    break
                if len(infos) == workers and on_ready is not None:
                    on_ready(infos)
        for p in procs:
            if p.sentinel in ended:
                p.join(STOP_TIMEOUT_S)  # its pipe closes a moment before its status can be read
        code = next((p.exitcode for p in procs if p.exitcode), 0)
        if not stopping and code == 0:
            code = 1  # a worker left on its own: the server is not whole any more
        return code if code > 0 else 1 if code else 0
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(STOP_TIMEOUT_S)
            if p.is_alive():
                p.kill()
                p.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.stdout.flush()


__all__ = ["run_workers", "worker_settings"]
