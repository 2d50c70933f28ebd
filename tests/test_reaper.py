"""The build's watchdog (indexer.reaper): a build that dies by SIGKILL leaves none of its processes behind, even
those re-parented to init (as Ray's agents are); one that ends normally leaves alone what it meant to leave."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignsearch.indexer.reaper import descendants

from conftest import REPO

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watchdog reads /proc (Linux)")

# A "build": starts the watchdog, then a grandchild whose parent exits 1.5 s later (init adopts it, as it adopts
# Ray's agents when the raylet dies); prints the grandchild's pid once it is adopted; then waits to be killed, or closes
# the watchdog and exits when told to ("close" on stdin).
BUILD = r"""
import os, subprocess, sys, time
from alignsearch.indexer.reaper import Reaper
reaper = Reaper()
time.sleep(0.3)
mid = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
    "print(p.pid, flush=True); time.sleep(1.5)"], stdout=subprocess.PIPE, text=True)
orphan = mid.stdout.readline().strip()
mid.wait()
print(orphan, flush=True)
if sys.stdin.readline().strip() == "close":
    reaper.close()
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", BUILD], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    orphan = int(proc.stdout.readline())
    assert _alive(orphan) and orphan not in descendants(proc.pid)  # adopted by init: not the build's any more
    return proc, orphan


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_a_killed_build_leaves_no_process_behind():
    proc, orphan = _start()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _gone_within(orphan, 5), "the build's orphaned process outlived it"


def test_a_build_that_ends_normally_kills_nothing():
    proc, orphan = _start()
    try:
        proc.communicate("close\n", timeout=30)
        assert proc.returncode == 0
        assert not _gone_within(orphan, 1.5), "the watchdog killed a process after a normal exit"
    finally:
        os.kill(orphan, signal.SIGKILL)
