"""Photos added, removed and re-described over HTTP, through the index's own crash-safe updates
(:mod:`indexer.update`: a copy changed, then swapped in atomically, under the index's lock).

One write runs at a time, on a thread of its own (searches keep running on theirs, on the version they
started with); an upload's photo is written under the images folder (``uploads/<sha256>.<ext>``: the same
photo twice is one photo) before the update that indexes it. When the update is swapped in, the server's
follower opens the new version at once, so a photo is searchable when its 201 is answered, and an answer is
sent only once its update is on disk (a crash before leaves the previous version, without it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from alignsearch.indexer import layout, update
from alignsearch.indexer.build import BuildOptions

from .follow import IndexFollower

UPLOADS = "uploads"
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}


def upload_id(data: bytes, image_format: str) -> str:
    """The id (and path under the images folder) of an uploaded photo: its content's hash."""
    return f"{UPLOADS}/{hashlib.sha256(data).hexdigest()[:24]}{SUFFIXES[image_format]}"


class Writer:
    """Runs the index updates the write routes ask for, one at a time, then has the follower swap to the
    result."""

    def __init__(self, follower: IndexFollower) -> None:
        self.follower = follower
        self._lock = asyncio.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="alignsearch-write")

    async def _run(self, fn: Callable[[], Any]) -> Any:
        async with self._lock:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, fn)
            await self.follower.check()
            return result

    async def add(self, data: bytes, image_format: str, captions: list[str], fields: dict[str, list[Any]]
                  ) -> tuple[str, bool]:
        """Index an uploaded photo (with its captions and fields); returns (its id, whether it is new)."""
        searcher = self.follower.searcher
        image_id = upload_id(data, image_format)
        root, folder, model = searcher.index.images_root, searcher.index.folder, searcher.model

        def work() -> bool:
            path = root / image_id
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                with layout.atomic_path(path) as tmp:
                    tmp.write_bytes(data)
            with tempfile.TemporaryDirectory(prefix="alignsearch-upload-") as tmp:
                caption_file = Path(tmp) / "captions.jsonl"
                caption_file.write_text("".join(json.dumps({"image": image_id, "caption": c}) + "\n"
                                                for c in captions))
                meta_file = Path(tmp) / "metadata.jsonl"
                meta_file.write_text(json.dumps({"image": image_id, **fields}) + "\n")
                options = BuildOptions(images=root, out=folder, captions=caption_file if captions else None,
                                       metadata=meta_file, files=[image_id], workers=1, batch_size=8, progress=False)
                report = update.add(model, folder, options)
            if report["skipped"]:
                raise ValueError("the photo could not be read for indexing")
            return report["images_added"] > 0

        return image_id, await self._run(work)

    async def delete(self, image_id: str) -> dict[str, Any]:
        folder = self.follower.searcher.index.folder
        return await self._run(lambda: update.delete(folder, [image_id]))

    async def set_fields(self, image_id: str, fields: dict[str, list[Any]]) -> dict[str, Any]:
        folder = self.follower.searcher.index.folder
        return await self._run(lambda: update.set_fields(folder, {image_id: fields}))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
