"""The index folder: file names, the manifest, checksums and atomic replacement.

An index is one folder::

    manifest.json            format version, model, dimension, counts, each collection's store backends
                             (``faiss``, ``faiss-codec``), FAISS factory strings and search settings,
                             sha256 of every data file, and its own sha256 (``seal``); written last
    metadata.sqlite          items, captions, tombstones, user columns
    images/global.faiss      global vectors (inner product on L2-normalised vectors), FAISS ids = row ids
    images/codec.faiss       the standalone FAISS codec of the per-region vectors (SQfp16 by default)
    images/codes.npy         uint8 codes of every region, items back to back (memory-mapped)
    images/offsets.npy       int64, item i's regions are codes[offsets[i]:offsets[i+1]]
    captions/...             the same for captions (per-word vectors)
    build_report.json        what the build skipped and why (not checksummed)

Data files are never rewritten in place: each is written to a temp name and renamed (:func:`atomic_path`), an
update works on a hard-linked copy (:func:`link_copy`), and a finished folder replaces the live one in one
step (:func:`replace_folder`). Builds and updates of one index take a lock beside it (:func:`exclusive`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA = "metadata.sqlite"
COLLECTIONS = ("images", "captions")
GLOBAL_FILE = "global.faiss"
CODEC_FILE = "codec.faiss"
CODES_FILE = "codes.npy"
OFFSETS_FILE = "offsets.npy"
SEAL = "seal"  # the manifest's own hash (:func:`seal`)
MAX_MANIFEST_BYTES = 16 << 20
DEFAULT_CODEC = "SQfp16"  # FAISS codec of the local (per-region / per-word) vectors


class IndexError_(ValueError):
    """An index folder that is missing, corrupt, or does not fit the model."""


class DiskFull(OSError):
    """A build or update ran out of disk space; its partial files are gone and the previous index is kept."""


# How a full disk reads where it has no errno: FAISS's writers (RuntimeError), SQLite, numpy's short write.
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "database or disk is full")
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` says the disk (or the user's quota) is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(t in text for t in _DISK_FULL_TEXT) or (isinstance(exc, OSError) and bool(_SHORT_WRITE.search(text)))


@contextmanager
def disk_full_is_one_line(target: Path, *leftovers: Path) -> Iterator[None]:
    """Turn a full disk inside the block into :class:`DiskFull` with one line naming ``target``, after
    removing ``leftovers`` (the partial work) so that the space they took is given back."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        raise DiskFull(f"no space left on the disk of {Path(target).parent} while writing {Path(target).name}: "
                       f"the partial files were removed and the previous index (if any) is unchanged; free some "
                       f"space and run it again") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(folder: Path, names: list[str]) -> dict[str, str]:
    """The sha256 of each file ``folder / name``, files hashed side by side on the CPU's cores (``hashlib``
    releases the GIL): the local store and the global index of a 1M-photo index, 3.1 and 1.8 GB, take as
    long as the larger one alone."""
    workers = min(len(names), os.cpu_count() or 1)
    if workers <= 1:
        return {name: sha256_file(folder / name) for name in names}
    largest_first = sorted(names, key=lambda name: -(folder / name).stat().st_size)
    with ThreadPoolExecutor(workers, thread_name_prefix="alignsearch-sha256") as pool:
        return dict(zip(largest_first, pool.map(lambda name: sha256_file(folder / name), largest_first)))


def data_files(folder: Path) -> list[str]:
    """Every data file of an index, relative to its folder: the metadata and whatever the collections' store
    backends wrote in their folders (hidden temp files, the manifest and reports excluded)."""
    files = [METADATA] if (folder / METADATA).is_file() else []
    for name in COLLECTIONS:
        if (folder / name).is_dir():
            files += sorted(p.relative_to(folder).as_posix() for p in (folder / name).rglob("*")
                            if p.is_file() and not p.name.startswith("."))
    return files


def write_manifest(folder: Path, fields: dict[str, Any], reuse: dict[str, dict] | None = None) -> dict[str, Any]:
    """Checksum every data file and write the manifest last (temp file + rename). ``reuse`` gives the entries
    of files known unchanged (hard links to an index whose manifest was checked), which are not read again."""
    reuse = reuse or {}
    files = data_files(folder)
    digests = sha256_files(folder, [f for f in files if f not in reuse])
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": fields.pop("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
        "files": {f: reuse[f] if f in reuse else {"sha256": digests[f], "bytes": (folder / f).stat().st_size}
                  for f in files},
    }
    manifest.pop(SEAL, None)
    manifest[SEAL] = seal(manifest)
    _write_json(folder / MANIFEST, manifest)
    return manifest


def _write_json(path: Path, content: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2, sort_keys=True))


def seal_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` with its seal (``index verify --seal`` does it for a manifest written before seals,
    once everything else verifies)."""
    manifest = {k: v for k, v in manifest.items() if k != SEAL}
    manifest[SEAL] = seal(manifest)
    _write_json(Path(folder) / MANIFEST, manifest)


def seal(manifest: dict[str, Any]) -> str:
    """sha256 over the manifest's canonical JSON (sorted keys, no spaces), its ``seal`` field left out: any
    edit of the manifest after it was written (a file's entry removed, a count changed) breaks it."""
    content = {k: v for k, v in manifest.items() if k != SEAL}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(folder: Path, unsealed_ok: bool = False) -> dict[str, Any]:
    """The manifest of the index in ``folder``, checked: JSON of the expected shape, sealed (unless
    ``unsealed_ok``), its seal matching its content; :class:`IndexError_` naming the file otherwise."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise IndexError_(f"{folder} is not an alignsearch index: no {MANIFEST}")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise IndexError_(f"{path}: corrupt manifest (over {MAX_MANIFEST_BYTES} bytes)")
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexError_(f"{path}: corrupt manifest (not JSON: {str(exc)[:80]})") from None
    except RecursionError:
        raise IndexError_(f"{path}: corrupt manifest (nested too deeply)") from None
    if not isinstance(manifest, dict):
        raise IndexError_(f"{path}: corrupt manifest (a JSON {type(manifest).__name__}, not an object)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexError_(f"{path}: index format {str(manifest.get('format_version'))[:20]!r} is not "
                          f"{FORMAT_VERSION}")
    problem = _shape_problem(manifest)
    if problem:
        raise IndexError_(f"{path}: corrupt manifest ({problem})")
    if SEAL not in manifest and unsealed_ok:
        return manifest
    if not isinstance(manifest.get(SEAL), str):
        raise IndexError_(f"{path}: the manifest is not sealed (written before manifests were sealed, or edited): "
                          f"`alignsearch index verify --seal {Path(folder)}` seals it if all else verifies")
    if manifest[SEAL] != seal(manifest):
        raise IndexError_(f"{path}: the manifest's seal does not match its content (it was changed after it "
                          f"was written): rebuild the index")
    return manifest


# The manifest's fields that readers index into, and the JSON type each must have.
_REQUIRED = {"files": dict, "counts": dict, "model": dict, "collections": dict, "images_root": str,
             "local_codec": str}


def _shape_problem(manifest: dict[str, Any]) -> str | None:
    """What is structurally wrong with a parsed manifest (a field missing or of the wrong type), or None."""
    for key, kind in _REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            return f"{key!r} is {'missing' if key not in manifest else 'not a JSON ' + kind.__name__}"
    for entry in manifest["files"].values():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("bytes"), int)):
            return "a 'files' entry has no sha256 and bytes"
    if not isinstance(manifest["model"].get("fingerprint"), str):
        return "'model' has no fingerprint"
    if not all(isinstance(manifest["collections"].get(name), dict) for name in COLLECTIONS):
        return f"'collections' lacks one of {', '.join(COLLECTIONS)}"
    for name in COLLECTIONS:
        entry = manifest["collections"][name]
        for key in ("factory", "type"):
            if not isinstance(entry.get(key), str):
                return f"collection {name!r} has no {key!r}"
        for key in ("backend", "local_backend"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                return f"collection {name!r}: {key!r} is not a name"
    if not isinstance(manifest["model"].get("dim"), int):
        return "'model' has no dim"
    if not all(isinstance(v, int) for v in manifest["counts"].values()):
        return "'counts' holds a value that is not a number"
    return None


def check_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems found: files missing, or whose size or sha256 differ from the manifest."""
    problems, sized = [], []
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{name}: size {path.stat().st_size} != {expected['bytes']} in the manifest")
        else:
            sized.append(name)
    digests = sha256_files(folder, sized)
    problems += [f"{name}: checksum does not match the manifest" for name in sized
                 if digests[name] != manifest["files"][name]["sha256"]]
    return problems


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(folder: Path) -> None:
    """Make the names in ``folder`` (files created, renamed or linked there) durable; a no-op where a folder
    cannot be opened for it (not POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (and itself): a copy made by :func:`link_copy` and changed is
    on disk, its hard links included, before it is swapped in. Files already on disk cost a system call each."""
    for path in sorted(Path(folder).rglob("*"), reverse=True):  # children before their folder
        if path.is_dir():
            fsync_dir(path)
        elif path.is_file():
            _fsync(path)
    fsync_dir(folder)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is fsynced and renamed over ``path``.

    Files are never rewritten in place, so an update may hard-link the files it does not change from the live
    index (see :func:`link_copy`) without the live index ever seeing a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        _fsync(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def link_copy(src: Path, dst: Path, copy: tuple[str, ...] = (METADATA,)) -> None:
    """Recreate the folder ``src`` at ``dst`` with hard links (no data copied), except the files named in
    ``copy`` (relative paths), which are copied because they are modified in place (SQLite)."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        target = dst / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.as_posix() in copy:
            shutil.copy2(path, target)
            continue
        try:
            os.link(path, target)
        except OSError:  # a file system without hard links
            shutil.copy2(path, target)


def real_path(target: Path) -> Path:
    """``target`` with its symlinks resolved (as far as it exists): an index named through a symlink is
    locked, rewritten and swapped where it really is, and the symlink stays a symlink."""
    return Path(os.path.realpath(target))


@contextmanager
def exclusive(target: Path) -> Iterator[None]:
    """Hold ``.{target}.lock`` (beside the index, symlinks resolved) for a build or update: a second one
    fails at once, whichever path names the index."""
    target = real_path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(f".{target.name}.lock")
    with open(lock, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except BlockingIOError as exc:
            raise RuntimeError(f"another build or update of {target} is running (lock {lock})") from exc
        yield  # the lock goes with the file descriptor, also when the process is killed


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def clean_leftovers(target: Path) -> list[Path]:
    """Remove what a killed update left beside the index in ``target`` (its work copy ``.NAME.update``, the
    encoded items ``.NAME.update.shards``, the previous version ``.NAME.old``), unless a build or update holds
    the index's lock (it is using them) or the folder cannot be written; returns what was removed."""
    target = real_path(target)
    leftovers = [p for p in (target.with_name(f".{target.name}.update"),
                             target.with_name(f".{target.name}.update.shards"), _old(target)) if p.exists()]
    if not leftovers or not target.is_dir():
        return []
    try:
        import fcntl

        fh = open(target.with_name(f".{target.name}.lock"), "a+")
    except (ImportError, OSError):  # no locks on this platform, or a folder this process cannot write
        return []
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # an update is running
            return []
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
    return leftovers


def recover(target: Path) -> None:
    """Finish an interrupted :func:`replace_folder`: if only the previous index survived, put it back."""
    if not target.exists() and _old(target).is_dir():
        _old(target).rename(target)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_folder(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``. An existing ``target`` is swapped out atomically where the OS can
    (``RENAME_EXCHANGE``: readers see the old index or the new, never none); elsewhere with two renames, and
    :func:`recover` restores the previous index if a crash falls between them."""
    recover(target)
    if not target.exists():
        new.rename(target)
        fsync_dir(target.parent)
        return
    old = _old(target)
    shutil.rmtree(old, ignore_errors=True)
    if _exchange(new, target):
        new.rename(old)  # ``new`` now holds the previous index
    else:
        target.rename(old)
        new.rename(target)
    fsync_dir(target.parent)  # the swap itself durable: a power cut after this keeps the new version
    shutil.rmtree(old, ignore_errors=True)
