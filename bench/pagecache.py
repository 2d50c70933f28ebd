"""The page cache and the machine's load, for honest timings.

Cold figures need an index whose files are not in the page cache. Writing ``/proc/sys/vm/drop_caches`` needs
a privileged root (a container's root is refused), so :func:`drop` flushes each file (``fsync``) and asks the
kernel to forget its clean pages (``posix_fadvise(POSIX_FADV_DONTNEED)``); :func:`cached_fraction` checks
with ``mincore`` how much of a file is still resident. The kernel keeps every page that a process maps, so a
searcher's own memory maps are cleared first (:func:`unmap`). Every timed part records the load average before and
after it (:func:`load`), since other work on the machine changes what a timing means.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from alignsearch.indexer import local_store

PAGE = os.sysconf("SC_PAGE_SIZE")


def files_under(folder: Path) -> list[Path]:
    """Every regular file under ``folder``."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


def unmap(arrays: Iterable[np.ndarray]) -> None:
    """Take the pages of memory-mapped arrays (``np.load(mmap_mode=...)``) out of this process's page tables
    (``MADV_DONTNEED``; the next access maps them again), so that :func:`drop` can evict them: without this, a
    page read once through a map stays cached however often the file is dropped. Other arrays are left alone."""
    for array in arrays:
        mapping = array.base if isinstance(array, np.memmap) else None
        if isinstance(mapping, mmap.mmap) and len(mapping):
            mapping.madvise(mmap.MADV_DONTNEED)


def drop(paths: Iterable[Path]) -> int:
    """Flush each file to disk and drop its pages from the page cache; returns the bytes covered."""
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def cached_fraction(path: Path) -> float:
    """Share of ``path``'s pages resident in the page cache (``mincore``); 0.0 for an empty file."""
    pages = resident_pages(path)
    return float(pages.mean()) if len(pages) else 0.0


def resident_pages(path: Path) -> np.ndarray:
    """For each page of ``path``, whether it is resident in the page cache (``mincore``)."""
    size = os.path.getsize(path)
    if size == 0:
        return np.zeros(0, dtype=bool)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        address = ctypes.addressof(ctypes.c_char.from_buffer(mm))  # the temporary export ends at once
        pages = local_store.resident(address, size)
    if pages is None:
        raise OSError(f"mincore failed on {path} (or this platform has none)")
    return pages


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable`` of ``/proc/meminfo``)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> dict[str, int]:
    """Resident memory of process ``pid`` (VmRSS, RssAnon, RssFile) in bytes, from ``/proc``."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def children(pid: int | None = None) -> list[int]:
    """Process ids whose parent is ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
