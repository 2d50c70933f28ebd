"""The index folder: file names, the manifest, checksums and atomic replacement.

An index is one folder::

    manifest.json            format version, model, dimension, counts, FAISS descriptions, sha256 of every file
    metadata.sqlite          items, captions, tombstones, user columns
    images/global.faiss      global vectors (inner product on L2-normalised vectors), ids = row ids
    images/codec.faiss       the standalone FAISS codec of the per-region vectors (SQfp16 by default)
    images/codes.npy         uint8 codes of every region, items back to back (memory-mapped)
    images/offsets.npy       int64, item i's regions are codes[offsets[i]:offsets[i+1]]
    captions/...             the same for captions (per-word vectors)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA = "metadata.sqlite"
COLLECTIONS = ("images", "captions")
GLOBAL_FILE = "global.faiss"
CODEC_FILE = "codec.faiss"
CODES_FILE = "codes.npy"
OFFSETS_FILE = "offsets.npy"


class IndexError_(ValueError):
    """An index folder that is missing, corrupt, or does not fit the model."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_files(folder: Path) -> list[str]:
    """Every data file of an index, relative to its folder (the manifest and reports excluded)."""
    files = [METADATA]
    for name in COLLECTIONS:
        files += [f"{name}/{f}" for f in (GLOBAL_FILE, CODEC_FILE, CODES_FILE, OFFSETS_FILE)]
    return [f for f in files if (folder / f).is_file()]


def write_manifest(folder: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Checksum every data file and write the manifest last (temp file + rename)."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": fields.pop("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
        "files": {f: {"sha256": sha256_file(folder / f), "bytes": (folder / f).stat().st_size}
                  for f in data_files(folder)},
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _fsync(tmp)
    tmp.replace(folder / MANIFEST)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise IndexError_(f"{folder} is not an alignsearch index: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IndexError_(f"{path}: corrupt manifest ({exc})") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexError_(f"{path}: index format {manifest.get('format_version')} is not {FORMAT_VERSION}")
    return manifest


def check_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems found: files missing, or whose size or sha256 differ from the manifest."""
    problems = []
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{name}: size {path.stat().st_size} != {expected['bytes']} in the manifest")
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{name}: checksum does not match the manifest")
    return problems


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover(target: Path) -> None:
    """Finish an interrupted :func:`replace_folder`: if only the previous index survived, put it back."""
    if not target.exists() and _old(target).is_dir():
        _old(target).rename(target)


def replace_folder(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; the previous ``target`` stays valid on disk until the final rename, and
    :func:`recover` restores it if a crash falls between the two renames."""
    recover(target)
    if target.exists():
        old = _old(target)
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)
