"""Photos added, removed and re-described over HTTP, through the index's own crash-safe updates
(:mod:`indexer.update`: a copy changed, then swapped in atomically, under the index's lock).

Uploads are committed in groups: the uploads that arrive within ``window_s`` of the first one waiting (or
while the previous update runs), at most ``max_batch`` of them, become ONE ``update.add`` (one transaction, one
encode of the new photos, one rewrite of the stores), so an update's fixed cost (copying the SQLite file,
rewriting and checksumming the stores) is paid once per group, not once per photo. Every request in a group
gets its answer only after the group's update is on disk (fsynced, swapped in) and the server's follower
serves it: a 201 means durable and searchable. A crash before that leaves the previous version, none of the
group in it.

A bad upload fails alone: its fields are checked against the index's types before it joins a group (422), a
photo the encoder cannot read is reported by the update as skipped and answered 415 while the others of its
group are indexed, and if a group still fails on its fields (two uploads giving a new field values of
different types) its uploads are committed one by one. Deletes and metadata changes run one at a time, in
arrival order with the groups (the writer is one lane). Searches keep running meanwhile, on the version they
started with.

An upload's photo is written under the images folder (``uploads/<sha256>.<ext>``: the same photo twice is one
photo) before the update that indexes it; a photo written for an update that never committed (the server was
killed) is removed when the writer next starts (:meth:`Writer.sweep`), so after a crash an upload that was not
acknowledged is either fully there (its update committed) or not there at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from alignsearch.indexer import layout, metadata, photo_fields, update
from alignsearch.indexer.build import BuildOptions

from .admission import overloaded
from .compute import lower_this_thread
from .follow import IndexFollower

log = logging.getLogger("alignsearch.service")

UPLOADS = "uploads"
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}


_UPLOAD_NAME = re.compile(r"\.?[0-9a-f]{24}(" + "|".join(re.escape(x) for x in SUFFIXES.values()) + r")(\.tmp)?")


def upload_id(data: bytes, image_format: str) -> str:
    """The id (and path under the images folder) of an uploaded photo: its content's hash."""
    return f"{UPLOADS}/{hashlib.sha256(data).hexdigest()[:24]}{SUFFIXES[image_format]}"


def _indexed(folder: Path, ids: list[str] | None = None) -> set[str]:
    """Which of ``ids`` (None: of the uploads) the index in ``folder`` has a row for, live or deleted."""
    conn = metadata.connect(layout.real_path(folder) / layout.METADATA, read_only=True)
    try:
        if ids is None:
            return {r[0] for r in conn.execute(f"SELECT id FROM images WHERE id LIKE '{UPLOADS}/%'")}
        return {r[0] for r in conn.execute("SELECT id FROM images WHERE id IN (SELECT value FROM json_each(?))",
                                           (json.dumps(ids),))}
    finally:
        conn.close()


COMMIT_RETRIES = 1  # a group whose update fails is committed again this many times before its requests fail


class Unreadable(ValueError):
    """The encoder could not read this photo (the update skipped it); the others of its group are indexed."""


@dataclass
class _Upload:
    image_id: str
    data: bytes
    captions: list[str]
    fields: dict[str, list[Any]]
    done: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class _Outcome:
    created: set[str]  # ids this update indexed
    skipped: set[str]  # ids the encoder could not read


class Writer:
    """Runs the index updates the write routes ask for, one at a time (uploads grouped), then has the follower
    swap to the result before anyone is answered."""

    def __init__(self, follower: IndexFollower, window_s: float = 0.2, max_batch: int = 64,
                 max_waiting: int = 256, observe: Callable[[int], None] | None = None, nice: int = 0) -> None:
        """``observe`` is told the size of each group committed; the updates (which encode the photos) run
        ``nice`` steps nicer than the searches."""
        self.follower = follower
        self.observe = observe
        self.window_s = max(0.0, window_s)
        self.max_batch = max(1, max_batch)
        self.max_waiting = max(1, max_waiting)
        self._lock = asyncio.Lock()  # one update at a time
        self._waiting: list[_Upload] = []
        self._full = asyncio.Event()
        self._flusher: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="alignsearch-write", initializer=lower_this_thread,
                                        initargs=(nice,))

    async def _run(self, fn: Callable[[], Any]) -> Any:
        async with self._lock:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, fn)
            await self.follower.check()
            return result

    async def add(self, data: bytes, image_format: str, captions: list[str], fields: dict[str, list[Any]]
                  ) -> tuple[str, bool]:
        """Index an uploaded photo (with its captions and fields) in the next group; returns (its id, whether it
        is new) once the group's update is durable and served. Raises :class:`photo_fields.FieldError` (a field
        that does not fit the index's types), :class:`Unreadable`, or ``OSError`` (the photo could not be
        stored)."""
        image_id = upload_id(data, image_format)
        known = self.follower.searcher.index.field_types
        photo_fields.typed({0: fields}, {**photo_fields.BUILTIN_TYPES, **known}, {0: "the photo"})  # alone first
        if len(self._waiting) >= self.max_waiting:
            raise overloaded("too many photos are waiting to be indexed; retry shortly")
        upload = _Upload(image_id, data, captions, fields, asyncio.get_running_loop().create_future())
        self._waiting.append(upload)
        if len(self._waiting) >= self.max_batch:
            self._full.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        # shielded: a client that hangs up does not take its photo out of a group being committed
        return image_id, await asyncio.shield(upload.done)

    async def _flush(self) -> None:
        """Commit the waiting uploads, a group at a time, until none wait."""
        loop = asyncio.get_running_loop()
        while self._waiting:
            left = self._waiting[0].arrived + self.window_s - time.monotonic()
            if left > 0 and len(self._waiting) < self.max_batch:
                self._full.clear()
                try:
                    await asyncio.wait_for(self._full.wait(), left)
                except asyncio.TimeoutError:
                    pass
            async with self._lock:  # uploads that arrive while a delete runs join this group
                group, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
                for attempt in range(1 + COMMIT_RETRIES):
                    try:
                        answers = await loop.run_in_executor(self._pool, self._commit_group, group)
                        await self.follower.check()
                        break
                    except Exception as exc:  # noqa: BLE001  (every request of the group gets the failure)
                        # an update is a transaction (a failed one leaves the index as it was, and its photos'
                        # files removed), so the group is committed again once before anyone gets an error
                        log.warning("a group of %d uploads failed to commit (%s)%s", len(group), exc,
                                    "; committing it again" if attempt < COMMIT_RETRIES else "", exc_info=True)
                        answers = [exc] * len(group)
                if self.observe:
                    self.observe(len(group))
            for upload, answer in zip(group, answers):
                if upload.done.done():
                    continue
                if isinstance(answer, BaseException):
                    upload.done.set_exception(answer)
                else:
                    upload.done.set_result(answer)

    def _commit_group(self, group: list[_Upload]) -> list[bool | BaseException]:
        """(In the writer's thread.) One update for ``group``; each upload's answer: whether its photo is new,
        or its own error. A group that fails on its fields is committed one upload at a time."""
        try:
            outcome = self._commit(group)
        except photo_fields.FieldError as exc:
            if len(group) == 1:
                return [exc]
            log.warning("a group of %d uploads failed on its fields; committing them one by one", len(group))
            return [answer for upload in group for answer in self._commit_group([upload])]
        answers: list[bool | BaseException] = []
        for upload in group:
            if upload.image_id in outcome.skipped:
                answers.append(Unreadable("the photo could not be read for indexing"))
            else:
                answers.append(upload.image_id in outcome.created)
                outcome.created.discard(upload.image_id)  # the same photo twice in a group: new once
        return answers

    def _commit(self, group: list[_Upload]) -> _Outcome:
        searcher = self.follower.searcher
        root, folder, model = searcher.index.images_root, searcher.index.folder, searcher.model
        ids = list(dict.fromkeys(u.image_id for u in group))
        written: dict[str, Path] = {}  # the files this group wrote: removed again unless indexed
        for image_id in ids:
            path = root / image_id
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                with layout.atomic_path(path) as tmp:
                    tmp.write_bytes(next(u.data for u in group if u.image_id == image_id))
                written[image_id] = path
        layout.fsync_dir(root / UPLOADS)
        try:
            outcome = self._update(group, ids, root, folder, model)
        except BaseException:
            indexed = _indexed(folder, list(written))  # a failure after the swap keeps what it indexed
            for image_id, path in written.items():
                if image_id not in indexed:
                    path.unlink(missing_ok=True)
            raise
        for image_id in outcome.skipped & set(written):
            written[image_id].unlink(missing_ok=True)
        return outcome

    def _update(self, group: list[_Upload], ids: list[str], root: Path, folder: Path, model: Any) -> _Outcome:
        fields: dict[str, dict[str, list[Any]]] = {}
        for u in group:  # the same photo twice: the later upload's value of a field wins
            fields.setdefault(u.image_id, {}).update(u.fields)
        with tempfile.TemporaryDirectory(prefix="alignsearch-upload-") as tmp:
            captions = [{"image": u.image_id, "caption": c} for u in group for c in u.captions]
            caption_file = Path(tmp) / "captions.jsonl"
            caption_file.write_text("".join(json.dumps(row) + "\n" for row in captions))
            meta_file = Path(tmp) / "metadata.jsonl"
            meta_file.write_text("".join(json.dumps({"image": i, **f}) + "\n" for i, f in fields.items()))
            options = BuildOptions(images=root, out=folder, captions=caption_file if captions else None,
                                   metadata=meta_file, files=ids, workers=1, batch_size=16, progress=False)
            report = update.add(model, folder, options)
        created, skipped = set(report["added_ids"]), {k["item"] for k in report["skipped"]}
        vanished = [i for i in ids if i not in created and i not in skipped and not (root / i).is_file()]
        if vanished:  # removed by another server's sweep between our write and our update: retried by the client
            raise FileNotFoundError(f"{len(vanished)} uploaded photo(s) were removed before being indexed")
        return _Outcome(created, skipped)

    def sweep(self) -> list[str]:
        """Remove the photos under ``uploads/`` that no image of the index names (written for a group whose
        update never committed: the server was killed); returns their ids. Run at start, before any upload;
        skipped (logged) while another update holds the index's lock."""
        index = self.follower.searcher.index
        folder = index.images_root / UPLOADS
        if not folder.is_dir():
            return []
        try:
            with layout.exclusive(index.folder):  # not while an update (which may be about to index them) runs
                known = _indexed(index.folder)
                removed = []
                for path in folder.iterdir():  # only names this writer gives (a user's own uploads/ stays)
                    image_id = f"{UPLOADS}/{path.name}"
                    if path.is_file() and _UPLOAD_NAME.fullmatch(path.name) and image_id not in known:
                        path.unlink(missing_ok=True)
                        removed.append(image_id)
                if removed:
                    layout.fsync_dir(folder)
        except (RuntimeError, OSError) as exc:
            log.warning("uploaded photos of unfinished updates were not swept: %s", exc)
            return []
        if removed:
            log.warning("removed %d uploaded photo(s) whose update never committed", len(removed))
        return removed

    async def delete(self, image_id: str) -> dict[str, Any]:
        folder = self.follower.searcher.index.folder
        return await self._run(lambda: update.delete(folder, [image_id]))

    async def set_fields(self, image_id: str, fields: dict[str, list[Any]]) -> dict[str, Any]:
        folder = self.follower.searcher.index.folder
        return await self._run(lambda: update.set_fields(folder, {image_id: fields}))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
