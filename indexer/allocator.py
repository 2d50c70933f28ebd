"""Keep freed memory in a build or serving process instead of handing it back to the kernel after every batch
(glibc).

By default glibc's malloc serves blocks of 128 kB and more with fresh ``mmap`` pages and unmaps them when they
are freed, and trims the top of its heap once 128 kB of it is free (it raises the first limit as it sees large
frees, but only while no setting was made). An encoder allocates and frees tens of megabytes of activations
for every batch, so without this the kernel zeroes and maps those pages again for every batch. The PyTorch
CPU tuning guide's answer is another allocator (jemalloc, tcmalloc) preloaded; a pip-installed tool cannot
count on one, so the build sets glibc's own limits instead: blocks under ``mmap_threshold`` come from the
heap, freed heap memory is kept up to ``trim_threshold``, and the heap grows ``top_pad`` at a time.

Measured on the 2-core CI machine, 800 Flickr8k-800 photos, the default model: ``build()`` takes 16.6-19.1 s
without it and 10.8-12.2 s with it, while the encoder alone on pre-decoded photos runs at the same ~90
images/s either way; ``alignsearch index build`` end to end (process start and model load included) 22.0 /
23.4 s without, 16.1 / 16.3 s with, peak RSS 1.08-1.14 GB without, 1.25 GB with. The cost: the process keeps
up to ``trim_threshold`` of freed memory.

Serving, image queries through the default model in a fresh process (median of 128, after a warm-up): 27 -> 22
ms per image one at a time, 23.4 -> 12.6 ms per image in micro-batches of 16; text queries unchanged (8 ms);
the process's RSS after those batches 826 MB against 570 MB (peak 825 against 724): the freed memory it keeps.

Process-wide: the CLI's ``index``, ``add``, ``serve`` and ``demo`` commands call :func:`keep_freed_memory`
before they load a model, the Ray engine's encoder actors when they start, and the benchmark suite for its
build timing; library calls to ``build`` do not change the allocator of the process that makes them.
``ALIGNSEARCH_MALLOC_TUNING=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
OPT_OUT = "ALIGNSEARCH_MALLOC_TUNING"


def keep_freed_memory(trim_threshold: int = 1 << 30, top_pad: int = 256 << 20,
                      mmap_threshold: int = 32 << 20) -> bool:
    """Set glibc malloc's trim threshold, top pad and mmap threshold for this process (sizes in bytes).

    Returns True when all three were set; False on a C library other than glibc, when ``mallopt`` refuses a
    value (the mmap threshold cannot exceed 32 MiB on 64-bit glibc), or when ``ALIGNSEARCH_MALLOC_TUNING=0``."""
    if os.environ.get(OPT_OUT, "1").strip() == "0" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad))
    return all([mallopt(param, value) == 1 for param, value in settings])


__all__ = ["OPT_OUT", "keep_freed_memory"]
