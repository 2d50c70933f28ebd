"""Following the index on disk: after ``alignsearch index add`` / ``index delete`` the server swaps to the
new version without a restart.

An update writes a new folder and swaps it in atomically (the manifest last), so the manifest's file
identity (inode, size, mtime) changes exactly when a new version is in place. :class:`IndexFollower` checks
it every ``interval`` seconds (and on ``POST /admin/reload``); on a change it opens the new version *fully*
in a worker thread (checksums verified, FAISS and stores loaded, with the model already in memory), and only
then replaces the searcher reference, in one assignment. A batch takes the reference once when it starts, so
requests in flight finish on the version they started on; the old one is freed when the last of them ends.
A version that fails to open (say, built with another model) is logged and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from alignsearch.indexer.index import Index
from alignsearch.indexer.layout import MANIFEST
from alignsearch.indexer.search import Searcher

from .batching import cancel_and_wait

log = logging.getLogger("alignsearch.service")

Signature = tuple[int, int, int, int] | None


def signature(folder: Path) -> Signature:
    """(device, inode, size, mtime) of the folder's manifest; None while there is none."""
    try:
        st = os.stat(Path(folder) / MANIFEST)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def version(searcher: Searcher) -> str:
    """A short digest of the manifest a searcher was opened from."""
    return hashlib.sha256(json.dumps(searcher.index.manifest, sort_keys=True).encode()).hexdigest()[:16]


class IndexFollower:
    """Holds the current :class:`Searcher` and replaces it when the index folder gets a new version."""

    def __init__(self, folder: str | Path, searcher: Searcher, interval_s: float = 1.0,
                 on_swap: Callable[[Searcher], None] | None = None) -> None:
        self.folder = Path(folder)
        self.searcher = searcher
        self.interval_s = interval_s
        self.on_swap = on_swap
        self.swaps = 0
        self.last_error: str | None = None
        self._seen = signature(self.folder)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        if self.interval_s > 0:
            self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # the watcher must outlive any one failed check
                log.exception("checking %s for a new index version failed", self.folder)

    async def check(self) -> bool:
        """Open and swap in the folder's version if its manifest changed since the last look; True if swapped."""
        async with self._lock:
            seen = signature(self.folder)
            if seen is None or seen == self._seen:
                return False
            current = self.searcher
            try:
                fresh = await asyncio.to_thread(lambda: Searcher(Index(self.folder), current.model,
                                                                       rerank_precision=current.rerank_precision))
            except Exception as exc:  # noqa: BLE001  (keep serving the version that works)
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("a new version of %s could not be opened, still serving the old one: %s",
                          self.folder, self.last_error)
                self._seen = seen  # retried when the manifest changes again
                return False
            self._seen = seen
            self.last_error = None
            if version(fresh) == version(current):
                return False
            self.searcher = fresh  # one reference assignment: requests see the old version or the new one
            self.swaps += 1
            counts = fresh.index.manifest.get("counts", {})
            log.warning("now serving a new version of %s: %s images, %s captions", self.folder.name,
                        counts.get("images"), counts.get("captions"))
            if self.on_swap:
                self.on_swap(fresh)
            return True
