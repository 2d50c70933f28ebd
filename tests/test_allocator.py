"""The build's allocator setting (indexer/allocator.py): freed memory stays in the process instead of going back
to the kernel, and the opt-out leaves glibc's defaults alone. Checked in fresh processes (it is process-wide)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from alignsearch.indexer.allocator import OPT_OUT

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/statm"),
                                reason="glibc's malloc on Linux only")

PROBE = """
import os, numpy as np
from alignsearch.indexer.allocator import keep_freed_memory
tuned = keep_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
block = np.ones(16 << 20, np.uint8)  # 16 MiB, touched
held = rss()
del block
print(tuned, (held - rss()) >> 20)
"""


def _probe(tuning: str) -> tuple[bool, int]:
    env = {**os.environ, OPT_OUT: tuning}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60, check=True)
    tuned, returned_mib = out.stdout.split()
    return tuned == "True", int(returned_mib)


def test_freed_blocks_stay_in_the_process_when_tuned():
    tuned, returned_mib = _probe("1")
    assert tuned and returned_mib < 4  # the 16 MiB came from the heap and stayed there


def test_the_opt_out_keeps_glibc_defaults():
    tuned, returned_mib = _probe("0")
    assert not tuned and returned_mib >= 15  # glibc's default: a block this big is unmapped on free
