"""Opening an index for reading: manifest checks, FAISS and local stores, metadata, verify and info."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from models.model import AlignModel

from . import faiss_index, layout, metadata
from .local_store import LocalStore


def check_model(manifest: dict[str, Any], model: AlignModel) -> None:
    """Refuse a model whose fingerprint differs from the one the index was built with."""
    expected = manifest["model"]["fingerprint"]
    if model.fingerprint != expected:
        raise layout.IndexError_(
            f"model fingerprint {model.fingerprint} ({getattr(model, 'source', '?')}) does not match the index's "
            f"{expected} ({manifest['model'].get('source')}): rebuild the index or load the model it was built with"
        )


@dataclass
class Collection:
    """One side of the index: the global FAISS index, the local store, and the tombstoned rows."""

    name: str
    index: faiss.Index
    store: LocalStore
    deleted: set[int]
    cpu_index: faiss.Index | None = None  # the CPU original when ``index`` is a GPU copy

    @property
    def live(self) -> int:
        return len(self.store) - len(self.deleted)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search (scores, ids), on the GPU copy unless ``k`` is beyond what GPU indexes return."""
        index = self.cpu_index if self.cpu_index is not None and k > faiss_index.GPU_MAX_K else self.index
        return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


class Index:
    """A read-only view of an index folder."""

    def __init__(self, folder: str | Path, check: str = "full", use_gpu: bool = True) -> None:
        self.folder = Path(folder)
        layout.recover(self.folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"index folder not found: {self.folder}")
        self.manifest = layout.read_manifest(self.folder)
        if check != "none":
            problems = layout.check_files(self.folder, self.manifest) if check == "full" else [
                f"{n}: missing or resized" for n, f in self.manifest["files"].items()
                if not (self.folder / n).is_file() or (self.folder / n).stat().st_size != f["bytes"]]
            if problems:
                raise layout.IndexError_(f"{self.folder}: files do not match the manifest: {'; '.join(problems)}")
        self.conn = metadata.connect(self.folder / layout.METADATA, read_only=True)
        self.collections: dict[str, Collection] = {}
        for name in layout.COLLECTIONS:
            cpu = faiss_index.read(self.folder / name / layout.GLOBAL_FILE, use_gpu=False,
                                   search_params=self.manifest["collections"][name].get("search_params"))
            index = faiss_index.to_gpu(cpu) if use_gpu else cpu
            self.collections[name] = Collection(name, index, LocalStore.open(self.folder / name),
                                                metadata.deleted_rows(self.conn, name),
                                                cpu_index=cpu if index is not cpu else None)

    @property
    def images(self) -> Collection:
        return self.collections["images"]

    @property
    def captions(self) -> Collection:
        return self.collections["captions"]

    @property
    def images_root(self) -> Path:
        return Path(self.manifest["images_root"])

    def rows(self, collection: str, rows: list[int]) -> dict[int, dict[str, Any]]:
        return metadata.row_dicts(self.conn, collection, rows)

    def image_by_id(self, image_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM images WHERE id = ? AND deleted = 0", (image_id,)).fetchone()
        return dict(row) if row else None

    def info(self) -> dict[str, Any]:
        """Counts, bytes per item, model and FAISS types."""
        files = self.manifest["files"]
        out: dict[str, Any] = {"folder": str(self.folder), "model": {k: self.manifest["model"][k]
                                                                      for k in ("fingerprint", "source", "dim")},
                               "counts": self.manifest["counts"], "local_codec": self.manifest["local_codec"]}
        for name, col in self.collections.items():
            n = max(len(col.store), 1)
            size = lambda f: files.get(f"{name}/{f}", {}).get("bytes", 0)  # noqa: E731
            out[name] = {
                "faiss": self.manifest["collections"][name]["factory"],
                "faiss_type": self.manifest["collections"][name]["type"],
                "items": len(col.store), "live": col.live,
                "local_vectors": int(col.store.offsets[-1]),
                "bytes_per_item": {
                    "global": round(size(layout.GLOBAL_FILE) / n, 1),
                    "local": round((size(layout.CODES_FILE) + size(layout.OFFSETS_FILE)) / n, 1),
                },
            }
        out["metadata_bytes"] = files[layout.METADATA]["bytes"]
        items = sum(len(col.store) for col in self.collections.values())
        out["metadata_bytes_per_item"] = round(out["metadata_bytes"] / max(items, 1), 1)
        return out


def verify(folder: str | Path) -> list[str]:
    """Every problem found: checksums, and counts across FAISS, local store and SQLite."""
    folder = Path(folder)
    manifest = layout.read_manifest(folder)
    problems = layout.check_files(folder, manifest)
    if problems:
        return problems
    index = Index(folder, check="none", use_gpu=False)
    for name, col in index.collections.items():
        total = metadata.count(index.conn, name, live_only=False)
        live = metadata.count(index.conn, name, live_only=True)
        if len(col.store) != total:
            problems.append(f"{name}: local store has {len(col.store)} items, SQLite {total}")
        if col.index.ntotal not in (live, total):
            problems.append(f"{name}: FAISS has {col.index.ntotal} vectors, SQLite {live} live / {total}")
        elif (ids := faiss_index.stored_ids(col.index)) is not None:
            rows = np.array(sorted(r[0] for r in index.conn.execute(
                f"SELECT row FROM {name}" + (" WHERE deleted = 0" if len(ids) == live else ""))), dtype=np.int64)
            if not np.array_equal(ids, rows):
                problems.append(f"{name}: FAISS ids are not SQLite's row ids")
        if manifest["counts"][name] != live:
            problems.append(f"{name}: manifest counts {manifest['counts'][name]}, SQLite {live} live")
        if int(col.store.offsets[-1]) != len(col.store.codes):
            problems.append(f"{name}: offsets end at {col.store.offsets[-1]} but there are {len(col.store.codes)} codes")
        if np.any(np.diff(col.store.offsets) < 0):
            problems.append(f"{name}: offsets are not increasing")
    return problems
