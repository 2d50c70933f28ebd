"""The server's compute threads: which thread runs what, and with how many torch threads."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest
import torch

from alignsearch.service.admission import Lanes
from alignsearch.service.compute import ComputeThreads, DaemonThreadExecutor, compute_threads
from alignsearch.service.settings import Settings


def test_a_daemon_thread_executor_runs_calls_in_order_on_one_daemon_thread():
    executor = DaemonThreadExecutor("test-worker")
    seen: list[tuple[int, str]] = []
    futures = [executor.submit(lambda i=i: seen.append((i, threading.current_thread().name)) or i) for i in range(5)]
    assert [f.result(5) for f in futures] == list(range(5))
    assert seen == [(i, "test-worker") for i in range(5)] and executor.thread.daemon
    with pytest.raises(ZeroDivisionError):
        executor.run(lambda: 1 / 0)
    assert executor.run(lambda: "still working") == "still working"  # an exception does not end the thread
    started, release = threading.Event(), threading.Event()
    running = executor.submit(lambda: started.set() or release.wait(5))
    waiting = executor.submit(lambda: "never run")
    assert started.wait(5)
    executor.shutdown(wait=False, cancel_futures=True)
    release.set()
    assert running.result(5) is True and waiting.cancelled()
    executor.thread.join(5)
    assert not executor.thread.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        executor.submit(lambda: None)


def test_the_heavy_thread_runs_torch_on_one_thread_and_leaves_the_others_their_count():
    default = DaemonThreadExecutor("before").run(torch.get_num_threads)
    threads = ComputeThreads()
    assert threads.light.run(torch.get_num_threads) == default
    assert threads.heavy.run(torch.get_num_threads) == 1
    # a thread that calls torch for the first time afterwards still gets the process's default
    assert DaemonThreadExecutor("after").run(torch.get_num_threads) == default
    assert compute_threads() is compute_threads()


def test_light_batches_of_both_lanes_share_the_light_thread_and_heavy_ones_run_apart():
    settings = Settings(max_batch=4, batch_wait_ms=1, heavy_work=2_000, max_work=20_000)
    threads = ComputeThreads()
    where: dict[str, set[str]] = {}

    def process(items):
        where.setdefault(items[0].split()[0], set()).add(threading.current_thread().name)
        return items

    async def run():
        text, image = Lanes("text", process, settings, threads=threads), Lanes("image", process, settings,
                                                                               threads=threads)
        await text.start()
        await image.start()
        try:
            await asyncio.gather(text.run("light text", 100, 10), image.run("light image", 100, 10),
                                 text.run("heavy text", 1_000, 20), image.run("heavy image", 1_000, 20))
        finally:
            await text.stop()
            await image.stop()

    asyncio.run(run())
    assert where == {"light": {threads.light.thread.name}, "heavy": {threads.heavy.thread.name}}
    assert threads.light.thread.name != threads.heavy.thread.name


def test_ctrl_c_while_a_long_call_runs_ends_the_command_at_once_with_130():
    import signal
    import subprocess
    import sys
    import time

    code = """
import time
from alignsearch.service.compute import DaemonThreadExecutor
worker = DaemonThreadExecutor("busy")
print("started", flush=True)
worker.run(time.sleep, 60)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "started"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    try:
        proc.wait(10)
    finally:
        proc.kill()
    assert proc.returncode == 130 and time.monotonic() - sent < 5
    assert proc.stderr.read().strip() == "interrupted"  # one line, no traceback, no abort


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_heavy_work_runs_nicer_than_the_cheap_queries():
    import os

    from alignsearch.service.compute import lower_this_thread

    executor = DaemonThreadExecutor("test-nice")
    base = os.getpriority(os.PRIO_PROCESS, os.getpid())
    nice_of_thread = lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # noqa: E731
    assert executor.run(lambda: lower_this_thread(10)) and executor.run(nice_of_thread) == min(19, base + 10)
    executor.run(lambda: lower_this_thread(10))  # again: no nicer (a second app in the same process)
    assert executor.run(nice_of_thread) == min(19, base + 10)
    assert nice_of_thread() == base  # the calling thread is untouched
    assert not lower_this_thread(0)
    executor.shutdown()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nice is POSIX")
def test_the_upload_decoders_run_nicer():
    import os

    from alignsearch.service.image_decode import decode_image
    from alignsearch.service.uploads import ImageLimits
    from alignsearch.service.decode_procs import ProcessDecoder

    pool = ProcessDecoder(decode_image, ImageLimits(1_000_000, 4000, 448, 100, 10**9), workers=1, prestart=False,
                          nice=7)
    try:
        worker = pool._start()
        base = os.getpriority(os.PRIO_PROCESS, os.getpid())
        assert os.getpriority(os.PRIO_PROCESS, worker.process.pid) == min(19, base + 7)
    finally:
        pool.close()
