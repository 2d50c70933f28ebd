"""Shards: the unit of progress of a build. Each is written to a temp folder and renamed when complete,
so a killed build resumes after its last finished shard."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignsearch.models.model import EncoderOutput


@dataclass
class Shard:
    """Encoded items: global vectors (n x D), local vectors back to back (sum(lengths) x D), and metadata."""

    global_vectors: np.ndarray
    local_vectors: np.ndarray
    lengths: np.ndarray
    items: list[dict[str, Any]]
    skipped: list[dict[str, str]]


def shard_from_output(out: EncoderOutput, items: list[dict[str, Any]], skipped: list[dict[str, str]]) -> Shard:
    """Split an encoder output into the shard's arrays (padding dropped)."""
    mask = out.mask.numpy()
    local = out.local.numpy()[mask] if len(items) else np.zeros((0, out.local.shape[-1]), np.float32)
    return Shard(out.global_emb.numpy().astype(np.float32), local.astype(np.float16),
                 mask.sum(1).astype(np.int64), items, skipped)


def empty_shard(dim: int, skipped: list[dict[str, str]]) -> Shard:
    return Shard(np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float16), np.zeros(0, np.int64), [], skipped)


def shard_dir(root: Path, collection: str, number: int) -> Path:
    return root / "shards" / f"{collection}-{number:05d}"


def is_done(root: Path, collection: str, number: int) -> bool:
    return (shard_dir(root, collection, number) / "items.json").is_file()


def write_shard(root: Path, collection: str, number: int, shard: Shard) -> None:
    final = shard_dir(root, collection, number)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "global.npy", shard.global_vectors)
    np.save(tmp / "local.npy", shard.local_vectors)
    np.save(tmp / "lengths.npy", shard.lengths)
    (tmp / "items.json").write_text(json.dumps({"items": shard.items, "skipped": shard.skipped}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def read_shard(root: Path, collection: str, number: int, mmap: bool = False) -> Shard:
    """A finished shard; with ``mmap`` its vectors stay on disk until used."""
    folder = shard_dir(root, collection, number)
    meta = json.loads((folder / "items.json").read_text())
    mode = "r" if mmap else None
    return Shard(np.load(folder / "global.npy", mmap_mode=mode), np.load(folder / "local.npy", mmap_mode=mode),
                 np.load(folder / "lengths.npy"), meta["items"], meta["skipped"])


def shard_numbers(root: Path, collection: str) -> list[int]:
    """The finished shards of ``collection`` under ``root``, in order."""
    return sorted(int(p.name.rsplit("-", 1)[1]) for p in (root / "shards").glob(f"{collection}-[0-9]*")
                  if not p.name.endswith(".tmp") and (p / "items.json").is_file())


def read_shards(root: Path, collection: str) -> list[Shard]:
    """Every finished shard of ``collection``, memory-mapped (metadata in memory, vectors on disk)."""
    return [read_shard(root, collection, n, mmap=True) for n in shard_numbers(root, collection)]

