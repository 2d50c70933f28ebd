"""Nothing a build starts outlives it: a watchdog process that ends the build's leftover descendants when the
build dies without cleaning up (SIGKILL, OOM killer, a power cut of the process).

A local Ray instance started by ``index build --engine ray`` is a tree of processes: ``ray.shutdown()`` ends it on
a normal exit, and the raylet and GCS die with their parent, but the raylet's agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) are re-parented to init and run on forever when the build is killed. The
:class:`Reaper` is a small process of its own session (a kill of the build's process group does not reach it)
that notes, every :data:`SCAN_S`, the processes descended from the build since the reaper started (pid and
start time, so a reused pid is never hit). It reads a pipe from the build: end of file without a word means the
build died, and it then kills every noted process still alive; :meth:`Reaper.close` (the normal exit) tells it
to leave them alone. Linux only (``/proc``); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

SCAN_S = 0.5
DONE = b"done\n"


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (name) ": state is field 3
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """The live descendants of ``root``: pid -> start time."""
    parents: dict[int, list[int]] = {}
    started: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                parents.setdefault(stat[0], []).append(int(entry))
                started[int(entry)] = stat[1]
    out, todo = {}, [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in out and child in started:
                out[child] = started[child]
                todo.append(child)
    return out


def watch(root: int, pipe: int) -> None:
    """The reaper's loop (in its own process): note ``root``'s new descendants until ``pipe`` ends."""
    existing = set(descendants(root))
    noted: dict[int, int] = {}
    message = b""
    while True:
        ready, _, _ = select.select([pipe], [], [], SCAN_S)
        if ready:
            chunk = os.read(pipe, 64)
            if chunk:
                message += chunk
                continue
            break
        noted.update({pid: t for pid, t in descendants(root).items() if pid not in existing and pid != os.getpid()})
    if message.startswith(DONE):
        return
    noted.update({pid: t for pid, t in descendants(root).items() if pid not in existing})  # what is left now
    for pid, start in noted.items():
        stat = _stat(pid)
        if stat is not None and stat[1] == start:  # the same process, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


class Reaper:
    """Starts the watchdog for this process (on Linux; ``start`` False: none, :meth:`close` does nothing);
    :meth:`close` on a normal exit. A context manager."""

    def __init__(self, start: bool = True) -> None:
        self.proc: subprocess.Popen | None = None
        self._write: int | None = None
        if not start or not sys.platform.startswith("linux"):
            return
        read, self._write = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-m", "alignsearch.indexer.reaper", str(os.getpid())],
                                     stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, close_fds=True)
        os.close(read)  # the write end is not inherited (os.pipe): Ray's processes never hold it open

    def close(self) -> None:
        """The build ends normally: the watchdog exits without killing anything."""
        if self._write is not None:
            try:
                os.write(self._write, DONE)
            finally:
                os.close(self._write)
                self._write = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    def __enter__(self) -> "Reaper":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.stdin.fileno())
