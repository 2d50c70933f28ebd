"""Opening an indexed photo for ``GET /images/{id}`` as what was indexed: a regular file under the images
root, reached without following any symlink below the root.

Each folder below the root, and the file itself, is opened relative to its parent with ``O_NOFOLLOW``, so a
photo replaced by a symlink after the build (to ``/etc/passwd``, to the index's manifest), or a folder on the
way replaced by one, is refused however the link is placed; a path that leaves the root (``..``, an absolute
path) is refused before anything is opened. The root itself may be a symlink (the user named it). The file is
served from the descriptor that was checked, so it cannot be swapped between the check and the read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

CHUNK = 1 << 16
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class NotServable(Exception):
    """The file is missing, is not a regular file, or is reached through a symlink or out of the root."""


def open_indexed(root: Path, rel: str) -> tuple[BinaryIO, os.stat_result]:
    """The file ``rel`` (a relative POSIX path from the index) under ``root``, open for reading, and its stat."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or any(p in ("..", ".", "") for p in parts):
        raise NotServable("outside the images folder")
    fds: list[int] = []
    try:
        fds.append(os.open(root, os.O_RDONLY | _DIRECTORY))
        for part in parts[:-1]:
            fds.append(os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW, dir_fd=fds[-1]))
        fd = os.open(parts[-1], os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), dir_fd=fds[-1])
    except OSError:  # ELOOP for a symlink, ENOTDIR, ENOENT, EACCES
        raise NotServable("not available") from None
    finally:
        for d in fds:
            os.close(d)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotServable("not a regular file")
    return os.fdopen(fd, "rb"), info


def open_recorded(root: Path, recorded: str) -> tuple[BinaryIO, os.stat_result]:
    """The file an index recorded for a photo: a path relative to the images root (opened by :func:`open_indexed`),
    or the absolute path of a photo added from another folder (``index add --images OTHER``), whose own folder
    is then the root: its last component is still opened without following a symlink."""
    path = PurePosixPath(recorded)
    if path.is_absolute():
        return open_indexed(Path(str(path.parent)), path.name)
    return open_indexed(root, recorded)


def chunks(fh: BinaryIO) -> Iterator[bytes]:
    """The file's bytes in chunks, closing it at the end (or when the client goes away)."""
    with fh:
        while chunk := fh.read(CHUNK):
            yield chunk
