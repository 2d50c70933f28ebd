"""Shards: the unit of progress of a build. Each is written to a temp folder and renamed when complete,
so a killed build resumes after its last finished shard."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignsearch.models.model import EncoderOutput


@dataclass
class Shard:
    """Encoded items: global vectors (n x D), local vectors back to back (sum(lengths) x D), and metadata."""

    global_vectors: np.ndarray
    local_vectors: np.ndarray
    lengths: np.ndarray
    items: list[dict[str, Any]]
    skipped: list[dict[str, str]]


ShardPart = tuple[np.ndarray, np.ndarray, np.ndarray]  # global float32, local float16 (no padding), lengths


def shard_part(out: EncoderOutput) -> ShardPart:
    """An encoder output's rows as a shard keeps them: global vectors float32, the real tokens' local vectors
    float16 back to back (padding dropped), their counts; done per batch, so a shard's float32 outputs are never
    held whole."""
    mask = out.mask.cpu()
    local = out.local.cpu()[mask].to(torch.float16) if len(out) else torch.zeros((0, out.local.shape[-1]),
                                                                                  dtype=torch.float16)
    return (out.global_emb.cpu().numpy().astype(np.float32), local.numpy(), mask.sum(1).numpy().astype(np.int64))


def shard_from_parts(parts: list[ShardPart], items: list[dict[str, Any]], skipped: list[dict[str, str]]) -> Shard:
    """A shard of the batches ``parts`` (:func:`shard_part`) of ``items``, in order."""
    return Shard(*(np.concatenate(arrays) for arrays in zip(*parts)), items, skipped)


def shard_from_output(out: EncoderOutput, items: list[dict[str, Any]], skipped: list[dict[str, str]]) -> Shard:
    """Split an encoder output into the shard's arrays (padding dropped)."""
    return shard_from_parts([shard_part(out)], items, skipped)


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

