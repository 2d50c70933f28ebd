"""Qdrant as the store backend of a collection (``index build --store qdrant``): both stores in one Qdrant
collection per side, reached in process (``--qdrant-path DIR``, Qdrant's core through ``qdrant-edge-py``) or on a
server or cluster (``--qdrant-url URL``, ``qdrant-client``; an API key comes from ``$QDRANT_API_KEY``, never
from the manifest). Engines: :mod:`indexer.qdrant_engines`.

Each collection holds one point per item (id = the metadata's row id, payload ``{"row": id}``) with the named
vectors ``global`` (dense, dot product) and ``local`` (the item's region or word vectors as a multivector,
``MAX_SIM`` comparator). The index folder keeps, per collection, ``qdrant.json`` (connection, collection, item
count) and ``lengths.npy`` (tokens per item); the manifest entry records the same connection. Searches only
see rows below the item count the folder records, so a server on the previous version of an index never meets
the rows an ``index add`` is writing.

**Text -> images runs inside Qdrant** (:meth:`QdrantGlobalStore.search_fused`): prefetch the top ``candidates``
by ``global``; score those same candidates with ``MAX_SIM`` on ``local`` (sum over the query's words of the best
region: TERAN's MrSw, exactly); rank by a *formula query* ``$score[0] + w * $score[1]``. The formula is exact
(the engine adds the two float32 scores it computed) and ranks inside the engine, so only ``k`` points come back;
the ``k`` hits' global scores are then recomputed from their stored global vectors (one retrieve) to report
``global_score`` and ``local_score = (S - S_global) / w`` separately. Alignments map as: ``MrSw`` -> weight
``w``; ``MrAVGw`` / ``CHAN-mean`` (MrSw over the number of words) -> weight ``w / n_words``; any other
(``MwSr``, ``Symm``, LSE forms) or ``w = 0`` has no MAX_SIM form, and the pipeline's own path runs instead:
the global search in Qdrant, the candidates' local vectors fetched from Qdrant, scored with our alignment.

**Image -> captions** always takes that path: MAX_SIM would sum over the query's (the image's) vectors, i.e.
MwSr, not the MrSw the model is scored with.

Quantization (``--qdrant-quantization scalar|binary``) is Qdrant's own on the ``local`` multivectors: the codes
in RAM, the float32 originals on disk, every segment optimized (quantized copies are made only then), and the
MAX_SIM stage scores the codes without rescoring (the point: the rerank reads the small codes), so the fused
score is approximate; the local store spec (the manifest's ``local_codec``) names it. Binary codes score on
another scale than cosine similarities (Qdrant's own), which the fused score inherits. Image -> captions
fetches the originals, so it is unchanged.

**Filters** (:mod:`indexer.filters`): the photos' fields are the images collection's payload
(:mod:`indexer.qdrant_filters`: written at build, ``index add`` and a fields update, with payload indexes on
every field), and text -> images maps the filter to a payload filter in the first prefetch, so Qdrant ranks the
allowed points only. Payload is written in place, not swapped with the index folder: each point's payload
carries the *fields version* it was written for (``fv``), ``qdrant.json`` the version of this index
(``fields_version``); a search counts only points of its version or older through the payload filter, and the
few rows a running (or failed) update has written ahead are taken from SQLite's answer (their ids), checked
again after the query (redone when an update moved meanwhile). An update first rewrites every row left ahead by a
failed one. Anything else (image -> captions, scorings without a MAX_SIM form, indexes written before payloads)
runs the pipeline's filtered first stage on the global vectors with SQLite's allowed rows as a point-id filter.
Either way the answer is the FAISS index's for the same filter.

**Under the index's guard**: ``qdrant.json`` (checksummed in the manifest) records at every write what the
collection holds below its row bound: the points with each named vector, an order-free digest of all their
vectors (sum of a hash per point and vector), and the hashes of a sample of points spread over the rows (the
last one included). Opening the index (``serve``, ``index info``) checks the counts, the sample and (up to
``OPEN_DIGEST_MAX`` rows: reading every vector through Qdrant's API costs about a millisecond each on a loaded
box) the global vectors' digest; ``index verify`` every vector, global and local. Fewer points than recorded (a deleted
``segments/``), changed bytes (a flipped vector file) or an unreadable file (a truncated ``chunk_0.mmap``) are
refused in one line naming the collection. The embedded store's own files change when it is opened (its
config, its segments' state), so they are not checksummed; what they hold is.

Not transactional: the index folder is swapped atomically, but points are written to Qdrant in place. A failed
``index add`` leaves points for rows the metadata does not have (hidden by the row bound; the retry overwrites
them, ids being rows); a failed ``index delete`` may have removed points whose rows stay live (they no longer
come back from a search).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from alignsearch.models.scoring import ScoringConfig

from . import metadata, qdrant_engines
from .layout import IndexError_, atomic_path
from .qdrant_engines import GLOBAL, LOCAL, QUANTIZATIONS, Engine, QdrantUnavailable
from .qdrant_filters import FV, Clause, HasVector, Ids, Range, index_kinds, payload, to_clause

NAME = "qdrant"
STATE_FILE, LENGTHS_FILE = "qdrant.json", "lengths.npy"
SAMPLE = 64  # points whose vectors' hashes qdrant.json records
OPEN_DIGEST_MAX = 20_000  # opening an index reads all global vectors of collections up to this many rows
DRIFT_RETRIES = 3  # filtered searches redone while an update moves rows ahead of this version
MOD = 1 << 64


def vector_hash(row: int, vector: np.ndarray) -> int:
    """A 64-bit hash of a point's vector (with its id, so that swapped points differ)."""
    data = np.int64(row).tobytes() + np.ascontiguousarray(vector, dtype="<f4").tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@dataclass(frozen=True)
class QdrantSettings:
    """Where the collections live: ``path`` (embedded) or ``url`` (server), and the local quantization."""

    url: str | None = None
    path: str | None = None
    api_key_env: str = qdrant_engines.API_KEY_ENV
    prefix: str = "alignsearch"

    def __post_init__(self) -> None:
        if bool(self.url) == bool(self.path):
            raise ValueError("--store qdrant needs exactly one of --qdrant-url URL and --qdrant-path DIR")
        if self.url:
            qdrant_engines.check_url(self.url)

    def engine(self) -> Engine:
        """The engine these settings reach (connected: a server that cannot be reached raises here)."""
        return qdrant_engines.engine(self.connection())

    def connection(self) -> dict[str, Any]:
        """The manifest's record of the connection (no secret: the key's environment variable, not the key)."""
        if self.path:
            return {"path": str(Path(self.path).resolve())}
        return {"url": self.url, "api_key_env": self.api_key_env}


def maxsim_weight(scoring: ScoringConfig, n_words: int) -> float | None:
    """The weight of Qdrant's MAX_SIM score that gives ``w * S_local`` for this alignment, or None when the
    alignment is not a multiple of MrSw (or ``w`` is 0, which leaves the local score unrecoverable)."""
    if scoring.local_weight == 0 or n_words == 0:
        return None
    if scoring.alignment == "MrSw":
        return scoring.local_weight
    if scoring.alignment == "MrAVGw":
        return scoring.local_weight / n_words
    return None


@dataclass
class QdrantCollection:
    """One Qdrant collection: the engine, its name, the dimension and the local quantization (the 'codec' of
    the local store: what new items are written through)."""

    connection: dict[str, Any]
    name: str
    dim: int
    quantization: str

    @property
    def engine(self) -> Engine:
        return qdrant_engines.engine(self.connection)

    def entry(self) -> dict[str, Any]:
        return {**self.connection, "collection": self.name, "dim": self.dim, "quantization": self.quantization}

    @classmethod
    def of(cls, entry: dict[str, Any]) -> "QdrantCollection":
        connection = {k: entry[k] for k in ("path", "url", "api_key_env") if entry.get(k)}
        return cls(connection, entry["collection"], int(entry["dim"]), entry.get("quantization", "none"))


class QdrantGlobalStore:
    """The ``global`` vectors of a Qdrant collection; removes really delete points."""

    backend = NAME
    real_deletes = True

    def __init__(self, collection: QdrantCollection, below: int | None = None, fields_version: int | None = None
                 ) -> None:
        self.collection = collection
        self.below = below  # rows at or above it are not (yet) this version's: never returned
        self.fields_version = fields_version  # None: no payload of fields (filters by ids only)
        self._count = collection.engine.count(collection.name, below) if below is not None else 0
        self._removed = {GLOBAL: [0, 0], LOCAL: [0, 0]}  # points and digest taken out since the last save

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored global vectors of ``rows`` (all present), in order."""
        col = self.collection
        found = col.engine.vectors(col.name, [int(r) for r in rows], GLOBAL)
        return np.stack([found[int(r)] for r in rows]) if len(rows) else np.zeros((0, col.dim), np.float32)

    def search_ids(self, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` of ``ids`` only (a point-id filter), as :meth:`search`."""
        return self._pad(self.collection.engine.nearest(self.collection.name, np.asarray(queries, np.float32), k,
                                                        self.below, Clause(must=[Ids(tuple(int(i) for i in ids))])), k)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._pad(self.collection.engine.nearest(self.collection.name, np.asarray(queries, np.float32), k,
                                                        self.below), k)

    @staticmethod
    def _pad(found: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(found), k), -np.inf, dtype=np.float32)
        ids = np.full((len(found), k), -1, dtype=np.int64)
        for i, (rows, s) in enumerate(found):
            ids[i, : len(rows)], scores[i, : len(rows)] = rows, s
        return scores, ids

    def search_fused(self, queries: np.ndarray, words: list[np.ndarray], k: int, candidates: int,
                     scoring: ScoringConfig, where: Any = None
                     ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] | None:
        """Text -> items ranked inside Qdrant by ``S_global + w * S_local`` (see the module's docstring): per
        query (rows, fused, global, local scores), best first; None when the scoring has no MAX_SIM form, or
        ``where`` (:class:`indexer.index.StoreFilter`) cannot run as a payload filter here."""
        weights = [maxsim_weight(scoring, len(w)) for w in words]
        if any(w is None for w in weights):
            return None
        if where is not None and self.fields_version is None:
            return None
        col, queries = self.collection, np.asarray(queries, np.float32)
        words = [np.asarray(w, np.float32) for w in words]
        quantized = col.quantization != "none"
        if where is None:
            found = col.engine.fused(col.name, queries, words, weights, candidates, k, self.below, quantized)
        else:
            found = self._fused_filtered(queries, words, weights, candidates, k, quantized, where)
            if found is None:
                return None
        stored = col.engine.vectors(col.name, sorted({int(r) for rows, _ in found for r in rows}), GLOBAL)
        out = []
        for query, (rows, fused) in zip(queries, found):  # the global part, from the hits' stored vectors
            g = np.array([stored[r] @ query for r in rows.tolist()], dtype=np.float32).reshape(len(rows))
            out.append((rows, fused, g, ((fused - g) / np.float32(scoring.local_weight)).astype(np.float32)))
        return out

    def _fused_filtered(self, queries: np.ndarray, words: list[np.ndarray], weights: list[float], candidates: int,
                        k: int, quantized: bool, where: Any) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """The fused query of the points the filter allows: this version's payload through the payload filter,
        rows written ahead of it by their ids (SQLite's answer); redone while such rows move; None if they keep
        moving (the caller then filters by ids only)."""
        col, version = self.collection, int(self.fields_version)
        current = Clause(must=[Range(FV, lte=version), to_clause(where.filter, where.types)])
        ahead_of = Clause(must_not=[Range(FV, lte=version)])
        for _ in range(DRIFT_RETRIES):
            ahead = col.engine.ids(col.name, self.below, ahead_of)
            extra = ahead[where.allowed.contains(ahead)]
            clause = Clause(should=[current, Ids(tuple(int(r) for r in extra))]) if len(extra) else current
            found = col.engine.fused(col.name, queries, words, weights, candidates, k, self.below, quantized,
                                     where=clause)
            if np.array_equal(col.engine.ids(col.name, self.below, ahead_of), ahead):
                if all(bool(where.allowed.contains(rows).all()) for rows, _ in found):
                    return found
                return None  # the payload disagrees with SQLite: the ids decide
        return None

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.collection.engine.upsert_global(self.collection.name, np.asarray(ids), np.asarray(vectors, np.float32))
        self._count += len(ids)

    def remove(self, ids: np.ndarray) -> int:
        ids = [int(i) for i in ids]
        col = self.collection
        present = col.engine.vectors(col.name, ids, GLOBAL)
        for which, found in ((GLOBAL, present), (LOCAL, col.engine.vectors(col.name, ids, LOCAL))):
            for row, vector in found.items():
                if len(vector):
                    self._removed[which][0] += 1
                    self._removed[which][1] = (self._removed[which][1] + vector_hash(row, vector)) % MOD
        col.engine.delete(col.name, ids)
        self._count -= len(present)
        return len(present)

    def count(self) -> int:
        return self._count

    def ids(self) -> np.ndarray | None:
        return self.collection.engine.ids(self.collection.name, self.below)

    def describe(self) -> dict[str, Any]:
        return {"backend": NAME, "factory": NAME, "type": NAME, "qdrant": self.collection.entry()}

    def save(self, folder: Path) -> None:
        """Persist the collection and renew what ``qdrant.json`` records of it (less the points removed)."""
        col = self.collection
        col.engine.flush(col.name)
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            return
        state = json.loads(path.read_text())
        check = state.get("check")
        if check is not None:
            for which, (points, digest) in self._removed.items():
                check["points"][which] -= points
                check["digest"][which] = _hex((int(check["digest"][which], 16) - digest) % MOD)
            check["sample"] = _sample(col, int(state["items"]))
            self._removed = {GLOBAL: [0, 0], LOCAL: [0, 0]}
        _write_state(folder, state)


class QdrantLocalStore:
    """The ``local`` multivectors of a Qdrant collection, gathered for K candidates in one retrieve."""

    backend = NAME

    def __init__(self, collection: QdrantCollection, lengths: np.ndarray, state: dict[str, Any] | None = None) -> None:
        self.codec = collection
        self._lengths = lengths
        self.state = state or {}

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def dim(self) -> int:
        return self.codec.dim

    @property
    def code_size(self) -> int:
        return 4 * self.codec.dim  # float32 originals (quantized copies come on top)

    @property
    def total_vectors(self) -> int:
        return int(self._lengths.sum())

    @property
    def nbytes(self) -> int:
        return self.total_vectors * self.code_size

    def disk_bytes(self) -> dict[str, int] | None:
        """Bytes the collection takes on disk, segments and write-ahead log (embedded store only; None on a
        server)."""
        return self.codec.engine.disk_bytes(self.codec.name)

    def lengths(self) -> np.ndarray:
        return self._lengths

    def check(self, dim: int | None = None) -> list[str]:
        problems = []
        if self._lengths.dtype != np.int64 or self._lengths.ndim != 1 or bool(np.any(self._lengths < 0)):
            problems.append(f"{LENGTHS_FILE}: {self._lengths.dtype} array of shape {self._lengths.shape}, expected "
                            f"int64 token counts")
        if dim is not None and self.codec.dim != dim:
            problems.append(f"{STATE_FILE}: a collection of {self.codec.dim}-d vectors, the model's are {dim}-d")
        return problems + self.check_points(full=False)

    def check_points(self, full: bool = True) -> list[str]:
        """What the collection holds against what ``qdrant.json`` recorded at the last write: the points with
        each vector, the sampled points' vectors, the digest of all global vectors (up to ``OPEN_DIGEST_MAX``
        rows unless ``full``) and, ``full``, of all local ones. Nothing for an index written before these
        records. Cost: a count and 64 retrieves, plus reading each vector digested once through Qdrant's API
        (about 0.8 ms per 384-d vector on the loaded 2-core box)."""
        check = self.state.get("check")
        if not check:
            return []
        col, items = self.codec, int(self.state.get("items", len(self._lengths)))
        where = f"{STATE_FILE}: Qdrant collection {col.name}" + (f" in {col.connection['path']}"
                                                                  if col.connection.get("path") else "")
        try:
            problems = []
            for which in (GLOBAL, LOCAL):
                held = col.engine.count(col.name, items, Clause(must=[HasVector(which)]))
                if held != check["points"][which]:
                    problems.append(f"{where}: {held} points with {which} vectors, {check['points'][which]} "
                                    f"recorded ({'fewer' if held < check['points'][which] else 'more'} than written)")
            if problems:
                return problems
            if _sample(col, items, list(map(int, check["sample"]))) != check["sample"]:
                return [f"{where}: sampled points' vectors differ from those written (changed bytes?)"]
            for which in (GLOBAL, LOCAL) if full else (GLOBAL,) if items <= OPEN_DIGEST_MAX else ():
                if _digest(col, items, which, 0) != int(check["digest"][which], 16):
                    problems.append(f"{where}: the {which} vectors differ from those written (changed bytes?)")
            return problems
        except QdrantUnavailable as exc:
            return [f"{where}: {exc}"]
        except Exception as exc:  # the engine's own errors on damaged files (plain Exception)
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            return [f"{where}: its data cannot be read ({reason})"]

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [int(r) for r in rows]
        found = self.codec.engine.vectors(self.codec.name, rows, LOCAL)
        longest = max([len(found[r]) for r in rows if r in found] or [0])
        local = torch.zeros(len(rows), longest, self.dim)
        mask = torch.zeros(len(rows), longest, dtype=torch.bool)
        for i, r in enumerate(rows):
            if r in found and len(found[r]):
                local[i, : len(found[r])] = torch.from_numpy(found[r].reshape(-1, self.dim))
                mask[i, : len(found[r])] = True
        return local, mask


class QdrantGlobalBackend:
    """Creates (from :class:`QdrantSettings`) and opens the global side of Qdrant collections."""

    name = NAME
    files: tuple[str, ...] = ()

    def __init__(self, settings: QdrantSettings | None = None) -> None:
        self.settings = settings

    def validate(self, spec: str, dim: int) -> None:
        if spec != NAME:
            raise ValueError(f"--faiss-factory does not apply to --store qdrant (got {spec!r})")

    def choose(self, n: int, dim: int, memory_budget_bytes: float) -> str:
        return NAME

    def training_size(self, spec: str, n: int) -> int:
        return 0

    def create(self, dim: int, spec: str, sample: np.ndarray | Callable[[], np.ndarray],
               codec: Any = None) -> QdrantGlobalStore:
        if not isinstance(codec, QdrantCollection):
            raise ValueError("the Qdrant global store needs the Qdrant local store of its collection")
        return QdrantGlobalStore(codec)

    def discard(self, folder: Path, entry: dict[str, Any]) -> None:
        """Drop the collection of a temporary index (see :func:`indexer.index.discard_stores`)."""
        collection = QdrantCollection.of(entry["qdrant"])
        collection.engine.drop(collection.name)

    def open(self, folder: Path, entry: dict[str, Any], use_gpu: bool = False,
             writable: bool = False) -> QdrantGlobalStore:
        state = _read_state(folder)
        with _one_line(folder):
            return QdrantGlobalStore(QdrantCollection.of(entry.get("qdrant") or state["collection"]), state["items"],
                                     state.get("fields_version"))

    def sync_fields(self, folder: Path, entry: dict[str, Any], conn: Any, rows: Iterable[int] | None) -> None:
        """Write the photos' fields (SQLite's, through ``conn``) as the payload of their points, for a new
        version of the index: every live row (``rows`` None: a new index, version 0), or ``rows`` (added or
        changed) and those a failed update left ahead of this version (version + 1). Payload indexes are made
        for new fields. An index written before payloads is left as it is (its filters go by ids)."""
        state = _read_state(folder)
        if rows is not None and "fields_version" not in state:
            return
        col = QdrantCollection.of(entry.get("qdrant") or state["collection"])
        if rows is None:
            version, wanted = 0, None
        else:
            version = int(state["fields_version"]) + 1
            ahead = col.engine.ids(col.name, None, Clause(must_not=[Range(FV, lte=version - 1)]))
            wanted = sorted({int(r) for r in rows} | set(ahead.tolist()))
        sql = "SELECT row FROM images WHERE deleted = 0"
        live = [r[0] for r in (conn.execute(sql) if wanted is None else
                               conn.execute(sql + " AND row IN (SELECT value FROM json_each(?))", (json.dumps(wanted),)))]
        # a new index has a point per row; after a failed update a live row may lack its point
        present = live if wanted is None or not live else \
            col.engine.ids(col.name, None, Clause(must=[Ids(tuple(live))])).tolist()
        types = metadata.field_types(conn)
        kinds = index_kinds(types)
        col.engine.index_payload(col.name, {k: v for k, v in kinds.items() if k not in state.get("payload_keys", [])})
        values = metadata.image_fields(conn, present)
        col.engine.set_payload(col.name, {r: payload(r, values.get(r, {}), types, version) for r in present})
        col.engine.flush(col.name)
        state.update(fields_version=version, payload_keys=sorted(kinds))
        _write_state(folder, state)


class QdrantLocalBackend:
    """Creates the Qdrant collection (its ``make_codec``), writes the items' local vectors, opens the local side."""

    name = NAME
    files = (STATE_FILE, LENGTHS_FILE)

    def __init__(self, settings: QdrantSettings | None = None) -> None:
        self.settings = settings

    @staticmethod
    def spec_for(spec: str, collection: str, regions: int | None = None, dim: int = 384) -> str:
        """The same quantization for both collections (Qdrant has no per-collection presets)."""
        return spec

    def validate(self, spec: str, dim: int) -> None:
        if spec not in QUANTIZATIONS:
            raise ValueError(f"unknown Qdrant quantization {spec!r} (choose from {', '.join(QUANTIZATIONS)})")

    def make_codec(self, dim: int, spec: str, sample: np.ndarray) -> QdrantCollection:
        """A new, empty Qdrant collection (a fresh name: a live index's collections are never touched)."""
        if self.settings is None:
            raise ValueError("a new Qdrant collection needs --qdrant-url or --qdrant-path")
        collection = QdrantCollection(self.settings.connection(), f"{self.settings.prefix}-{uuid.uuid4().hex[:12]}",
                                      dim, spec)
        collection.engine.create(collection.name, dim, spec)
        return collection

    def write(self, folder: Path, codec: QdrantCollection, parts: Iterable[np.ndarray], lengths: np.ndarray,
              previous: QdrantLocalStore | None = None) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        row = 0 if previous is None else len(previous)
        ends = np.cumsum(lengths)  # item i's vectors end at ends[i] (counted over all parts)
        buffer, base, item, ids, vectors = np.zeros((0, codec.dim), np.float32), 0, 0, [], []
        for part in parts:
            buffer = np.concatenate([buffer, np.asarray(part, dtype=np.float32).reshape(-1, codec.dim)])
            while item < len(lengths) and ends[item] - base <= len(buffer):
                if lengths[item]:  # an item without tokens has no local vectors
                    ids.append(row + item)
                    vectors.append(buffer[ends[item] - lengths[item] - base : ends[item] - base])
                item += 1
                if len(ids) == qdrant_engines.BATCH:
                    codec.engine.set_local(codec.name, ids, vectors)
                    ids, vectors = [], []
            consumed = int(ends[item - 1]) - base if item else 0
            buffer, base = buffer[consumed:], base + consumed
        if ids:
            codec.engine.set_local(codec.name, ids, vectors)
        codec.engine.flush(codec.name)
        all_lengths = lengths if previous is None else np.concatenate([previous.lengths(), lengths])
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / LENGTHS_FILE) as tmp, open(tmp, "wb") as fh:
            np.save(fh, all_lengths.astype(np.int64))
        state = dict(previous.state) if previous is not None else {}
        old = state.get("check")
        check = {"points": {GLOBAL: 0, LOCAL: 0}, "digest": {GLOBAL: _hex(0), LOCAL: _hex(0)}, "sample": {}} \
            if old is None else old
        first = row if old is not None else 0  # an index written before these records: all its points
        for which in (GLOBAL, LOCAL):  # the new points as stored, read back
            counted = [0]
            digest = _digest(codec, len(all_lengths), which, first, counted)
            check["points"][which] += counted[0]
            check["digest"][which] = _hex((int(check["digest"][which], 16) + digest) % MOD)
        check["sample"] = _sample(codec, len(all_lengths))
        state.update(collection=codec.entry(), items=len(all_lengths), check=check)
        _write_state(folder, state)

    def open(self, folder: Path) -> QdrantLocalStore:
        state = _read_state(folder)
        return QdrantLocalStore(QdrantCollection.of(state["collection"]), np.load(folder / LENGTHS_FILE), state)


def _read_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {STATE_FILE} (not a Qdrant-backed collection)")
    return json.loads(path.read_text())


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    with atomic_path(Path(folder) / STATE_FILE) as tmp:
        tmp.write_text(json.dumps(state, indent=2))


class _one_line:
    """Qdrant that cannot be opened, as the index's one-line error naming the collection folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        if isinstance(exc, QdrantUnavailable):
            raise IndexError_(f"{self.folder / STATE_FILE}: {exc}") from None
        return False


def _hex(value: int) -> str:
    return f"{value:016x}"


def _digest(col: QdrantCollection, items: int, which: str, first: int, counted: list[int] | None = None) -> int:
    """Sum (mod 2^64) of the hashes of the ``which`` vectors of the points in rows ``first`` to ``items``."""
    total, n = 0, 0
    for row, vectors in col.engine.scan(col.name, items, [which], Clause(must=[Range("row", gte=first)])):
        vector = vectors.get(which)
        if vector is not None and vector.size:
            total, n = (total + vector_hash(row, vector)) % MOD, n + 1
    if counted is not None:
        counted[0] = n
    return total


def _sample(col: QdrantCollection, items: int, rows: list[int] | None = None) -> dict[str, list[str | None]]:
    """The hashes of the global and local vectors of ``rows`` (default: ``SAMPLE`` rows spread evenly over
    ``0 .. items - 1``, the last included), by row; None for a vector (or point) that is not there."""
    if rows is None:
        rows = sorted({int(r) for r in np.linspace(0, items - 1, min(SAMPLE, items)).round()}) if items else []
    found = {which: col.engine.vectors(col.name, rows, which) for which in (GLOBAL, LOCAL)} if rows else {}
    return {str(r): [_hex(vector_hash(r, found[w][r])) if r in found[w] and found[w][r].size else None
                     for w in (GLOBAL, LOCAL)] for r in rows}


GLOBAL_BACKEND, LOCAL_BACKEND = QdrantGlobalBackend(), QdrantLocalBackend()
