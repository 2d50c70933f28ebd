"""The two ways to reach Qdrant, behind one small interface: its core in process (``qdrant-edge-py``, for
``--qdrant-path``) and a server or cluster over the network (``qdrant-client``, for ``--qdrant-url``).

Both hold, per collection, the named vectors ``global`` (dense, dot product) and ``local`` (a multivector with
the ``MAX_SIM`` comparator, no HNSW graph: it is only ever scored on prefetched candidates) and a payload
``{"row": ROW}``; point ids are the metadata's row ids. The fused query is the same tree in both:
``prefetch[0]`` = top ``candidates`` by ``global``; ``prefetch[1]`` = those same candidates scored by ``MAX_SIM``
on ``local``; the query = the formula ``$score[0] + weight * $score[1]``. Both packages are imported only when an
engine is made (the ``qdrant`` extra), so the rest of the indexer runs without them.

Filters (``where``) come as the engine-neutral tree of :mod:`indexer.qdrant_filters`, ANDed with the row bound
(``row < below``); each engine converts it to its own classes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

import numpy as np

from .qdrant_filters import AnyOf, Clause, HasVector, Ids, Match, Range

GLOBAL, LOCAL = "global", "local"
QUANTIZATIONS = ("none", "scalar", "binary")
BATCH = 256  # points per upsert
API_KEY_ENV = "QDRANT_API_KEY"


class QdrantUnavailable(RuntimeError):
    """Qdrant cannot be reached, opened or is missing a package (one line, for the CLI)."""


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise QdrantUnavailable(f"the Qdrant store needs the {module.replace('_', '-')} package: "
                                "pip install 'alignsearch[qdrant]'") from None


class Engine:
    """What the Qdrant stores need from an engine; ids are row ids, vectors float32."""

    def create(self, name: str, dim: int, quantization: str) -> None: ...
    def drop(self, name: str) -> None: ...
    def upsert_global(self, name: str, ids: np.ndarray, vectors: np.ndarray) -> None: ...
    def set_local(self, name: str, ids: list[int], vectors: list[np.ndarray]) -> None: ...
    def delete(self, name: str, ids: list[int]) -> None: ...
    def count(self, name: str, below: int | None, where: Clause | None = None) -> int: ...
    def ids(self, name: str, below: int | None, where: Clause | None = None) -> np.ndarray: ...
    def vectors(self, name: str, ids: list[int], which: str) -> dict[int, np.ndarray]: ...
    def set_payload(self, name: str, payloads: dict[int, dict[str, Any]]) -> None:
        """Replace the payload of each point (id -> payload)."""

    def index_payload(self, name: str, kinds: dict[str, str]) -> None:
        """Payload indexes on these keys (``keyword``, ``float`` or ``integer``)."""

    def scan(self, name: str, below: int | None, which: list[str], where: Clause | None = None
             ) -> Iterable[tuple[int, dict[str, np.ndarray]]]:
        """Every point below ``below`` (matching ``where``) with its vectors ``which`` (those it has)."""
    def flush(self, name: str) -> None: ...
    def disk_bytes(self, name: str) -> dict[str, int] | None:
        """Bytes on disk by part, or None where the data is on a server."""

    def nearest(self, name: str, queries: np.ndarray, k: int, below: int | None, where: Clause | None = None
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, (row ids, scores) of the top ``k`` by ``global`` (of the points ``where`` allows)."""

    def fused(self, name: str, queries: np.ndarray, words: list[np.ndarray], weights: list[float], candidates: int,
              k: int, below: int | None, quantized: bool = False, where: Clause | None = None
              ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query (one request for all), (row ids, scores) of the top ``k`` of
        ``global + weight * MAX_SIM(words, local)`` over the top ``candidates`` by ``global`` (of the points
        ``where`` allows: the filter is in the first prefetch); ``quantized``: MAX_SIM on the quantized
        multivectors, not rescored."""


def _split(ids: np.ndarray, vectors: np.ndarray) -> Iterable[tuple[list[int], np.ndarray]]:
    for start in range(0, len(ids), BATCH):
        yield [int(i) for i in ids[start : start + BATCH]], vectors[start : start + BATCH]


class EdgeEngine(Engine):
    """Qdrant's core in this process (``qdrant-edge-py``): one shard per collection under ``path``.

    A shard is locked by the process that opens it (its write-ahead log), so shards are opened once per
    process and shared (:func:`engine`); a second process gets a one-line error."""

    def __init__(self, path: str) -> None:
        self.edge = _require("qdrant_edge")
        self.path = Path(path)
        self.shards: dict[str, Any] = {}

    def _shard(self, name: str) -> Any:
        if name not in self.shards:
            folder = self.path / name
            if not folder.is_dir():
                raise QdrantUnavailable(f"no Qdrant collection {name} in the embedded store {self.path}")
            try:
                self.shards[name] = self.edge.EdgeShard.load(str(folder))
            except Exception as exc:  # the bindings raise plain Exception
                raise QdrantUnavailable(_edge_problem(self.path, exc)) from None
        return self.shards[name]

    def create(self, name: str, dim: int, quantization: str) -> None:
        e = self.edge
        quant = {"none": None, "scalar": lambda: e.ScalarQuantizationConfig(e.ScalarType.Int8, always_ram=True),
                 "binary": lambda: e.BinaryQuantizationConfig(always_ram=True)}[quantization]
        # quantized copies are made when a segment is optimized: with quantization, every segment is (threshold 1 kB)
        config = e.EdgeConfig(optimizers=e.EdgeOptimizersConfig(indexing_threshold=1) if quant else None, vectors={
            GLOBAL: e.EdgeVectorParams(size=dim, distance=e.Distance.Dot),
            LOCAL: e.EdgeVectorParams(size=dim, distance=e.Distance.Dot,
                                      multivector_config=e.MultiVectorConfig(e.MultiVectorComparator.MaxSim),
                                      hnsw_config=e.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10000),
                                      quantization_config=quant() if quant else None,
                                      on_disk=True if quant else None)})
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.shards[name] = e.EdgeShard.create(str(self.path / name), config)
        except Exception as exc:
            raise QdrantUnavailable(_edge_problem(self.path, exc)) from None

    def drop(self, name: str) -> None:
        shard = self.shards.pop(name, None)
        if shard is not None:
            shard.close()
        shutil.rmtree(self.path / name, ignore_errors=True)

    def upsert_global(self, name: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        e = self.edge
        for part, vecs in _split(ids, vectors):
            self._shard(name).update(e.UpdateOperation.upsert_points(
                [e.Point(i, {GLOBAL: v.tolist()}, {"row": i}) for i, v in zip(part, vecs)]))

    def set_local(self, name: str, ids: list[int], vectors: list[np.ndarray]) -> None:
        e = self.edge
        self._shard(name).update(e.UpdateOperation.update_vectors(
            [e.PointVectors(i, {LOCAL: v.tolist()}) for i, v in zip(ids, vectors)]))

    def delete(self, name: str, ids: list[int]) -> None:
        self._shard(name).update(self.edge.UpdateOperation.delete_points(ids))

    def _convert(self, node: Any) -> Any:
        e = self.edge
        if isinstance(node, Clause):
            parts = {k: [self._convert(c) for c in getattr(node, k)] or None for k in ("must", "should", "must_not")}
            return e.Filter(**parts)
        if isinstance(node, Match):
            return e.FieldCondition(node.key, match=e.MatchValue(node.value))
        if isinstance(node, AnyOf):
            return e.FieldCondition(node.key, match=e.MatchAny(list(node.values)))
        if isinstance(node, Range):
            return e.FieldCondition(node.key, range=e.RangeFloat(gt=node.gt, gte=node.gte, lt=node.lt, lte=node.lte))
        if isinstance(node, Ids):
            return e.HasIdCondition(set(node.ids))
        if isinstance(node, HasVector):
            return e.HasVectorCondition(node.name)
        raise TypeError(f"not a filter node: {type(node).__name__}")

    def _below(self, below: int | None, where: Clause | None = None) -> Any:
        must = ([] if below is None else [Range("row", lt=below)]) + ([] if where is None else [where])
        return self._convert(Clause(must=must)) if must else None

    def count(self, name: str, below: int | None, where: Clause | None = None) -> int:
        return int(self._shard(name).count(self.edge.CountRequest(exact=True, filter=self._below(below, where))))

    def ids(self, name: str, below: int | None, where: Clause | None = None) -> np.ndarray:
        out, offset = [], None
        while True:
            records, offset = self._shard(name).scroll(self.edge.ScrollRequest(
                offset=offset, limit=10_000, filter=self._below(below, where), with_payload=False, with_vector=False))
            out += [int(r.id) for r in records]
            if offset is None:
                return np.sort(np.array(out, dtype=np.int64))

    def vectors(self, name: str, ids: list[int], which: str) -> dict[int, np.ndarray]:
        records = self._shard(name).retrieve(ids, with_payload=False, with_vector=[which])
        return {int(r.id): np.asarray(r.vector[which], dtype=np.float32) for r in records
                if r.vector and which in r.vector}  # a point without this vector (an item without tokens): left out

    def scan(self, name: str, below: int | None, which: list[str], where: Clause | None = None
             ) -> Iterable[tuple[int, dict[str, np.ndarray]]]:
        offset = None
        while True:
            records, offset = self._shard(name).scroll(self.edge.ScrollRequest(
                offset=offset, limit=1_000, filter=self._below(below, where), with_payload=False, with_vector=which))
            for r in records:
                yield int(r.id), {w: np.asarray(v, dtype=np.float32) for w, v in (r.vector or {}).items()}
            if offset is None:
                return

    def set_payload(self, name: str, payloads: dict[int, dict[str, Any]]) -> None:
        shard, op = self._shard(name), self.edge.UpdateOperation.overwrite_payload
        for point, payload in payloads.items():
            shard.update(op([int(point)], payload))

    def index_payload(self, name: str, kinds: dict[str, str]) -> None:
        e = self.edge
        schema = {"keyword": e.PayloadSchemaType.Keyword, "float": e.PayloadSchemaType.Float,
                  "integer": e.PayloadSchemaType.Integer}
        for key, kind in kinds.items():
            self._shard(name).update(e.UpdateOperation.create_field_index(key, schema[kind]))

    def flush(self, name: str) -> None:
        """Run Qdrant's optimizers (merge segments; an HNSW graph on ``global`` once a segment passes the
        indexing threshold, as a server does in the background), then persist."""
        self._shard(name).optimize()
        self._shard(name).flush()

    def disk_bytes(self, name: str) -> dict[str, int] | None:
        """Bytes allocated on disk (not the files' preallocated sizes): the segments and the write-ahead log."""
        out = {"segments": 0, "wal": 0}
        for p in (self.path / name).rglob("*"):
            if p.is_file():
                part = "wal" if "wal" in p.relative_to(self.path / name).parts[:1] else "segments"
                out[part] += p.stat().st_blocks * 512
        return out

    def nearest(self, name: str, queries: np.ndarray, k: int, below: int | None, where: Clause | None = None
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        e = self.edge
        batch = e.QueryBatchRequest([e.QueryRequest(limit=k, query=e.Query.Nearest(q.tolist(), using=GLOBAL),
                                                    filter=self._below(below, where)) for q in queries])
        return [_unpack(points) for points in self._query(name, batch)]

    def _query(self, name: str, batch: Any) -> list[Any]:
        try:
            return self._shard(name).query_batch(batch)
        except QdrantUnavailable:
            raise
        except Exception as exc:  # damaged files: one line naming the store, not a traceback
            raise QdrantUnavailable(_edge_problem(self.path, exc)) from None

    def fused(self, name: str, queries: np.ndarray, words: list[np.ndarray], weights: list[float], candidates: int,
              k: int, below: int | None, quantized: bool = False, where: Clause | None = None
              ) -> list[tuple[np.ndarray, np.ndarray]]:
        e, x = self.edge, self.edge.Expression
        params = e.SearchParams(quantization=e.QuantizationSearchParams(rescore=False)) if quantized else None
        requests = []
        for query, word_vectors, weight in zip(queries, words, weights):
            first = e.Prefetch(limit=candidates, query=e.Query.Nearest(query.tolist(), using=GLOBAL),
                               filter=self._below(below, where))
            local = e.Prefetch(limit=candidates, query=e.Query.Nearest(word_vectors.tolist(), using=LOCAL),
                               prefetches=[first], params=params)
            formula = e.Formula(x.Sum([x.Variable("$score[0]"),
                                       x.Mult([x.Constant(weight), x.Variable("$score[1]")])]))
            requests.append(e.QueryRequest(limit=k, query=formula, prefetches=[first, local]))
        return [_unpack(points) for points in self._query(name, e.QueryBatchRequest(requests))]


def _unpack(points: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([int(p.id) for p in points], dtype=np.int64),
            np.array([p.score for p in points], dtype=np.float32))


def _edge_problem(path: Path, exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "WouldBlock" in text or "lock" in text.lower():
        return (f"the embedded Qdrant store {path} is open in another process (a running server or update?): "
                "stop it first, or serve from a Qdrant server (--qdrant-url)")
    return f"embedded Qdrant store {path}: {text}"


class ClientEngine(Engine):
    """A Qdrant server or cluster through ``qdrant-client`` (or the client's own local mode: ``:memory:``)."""

    def __init__(self, url: str, api_key_env: str = API_KEY_ENV, timeout: int = 10) -> None:
        qdrant_client = _require("qdrant_client")
        from qdrant_client import models

        self.m = models
        self.where = describe_url(url)
        try:
            if url == ":memory:":
                self.client = qdrant_client.QdrantClient(location=":memory:")
            else:
                self.client = qdrant_client.QdrantClient(url=url, api_key=os.environ.get(api_key_env) or None,
                                                         timeout=timeout, check_compatibility=False)
            self.client.get_collections()
        except Exception as exc:
            raise QdrantUnavailable(f"cannot reach the Qdrant server at {self.where}: {_reason(exc)}") from None

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise QdrantUnavailable(f"Qdrant server at {self.where}: {_reason(exc)}") from None

    def create(self, name: str, dim: int, quantization: str) -> None:
        m = self.m
        quant = {"none": None,
                 "scalar": lambda: m.ScalarQuantization(scalar=m.ScalarQuantizationConfig(type=m.ScalarType.INT8,
                                                                                         always_ram=True)),
                 "binary": lambda: m.BinaryQuantization(binary=m.BinaryQuantizationConfig(always_ram=True))}[quantization]
        self._call(self.client.create_collection, name, vectors_config={
            GLOBAL: m.VectorParams(size=dim, distance=m.Distance.DOT),
            LOCAL: m.VectorParams(size=dim, distance=m.Distance.DOT, hnsw_config=m.HnswConfigDiff(m=0),
                                  multivector_config=m.MultiVectorConfig(comparator=m.MultiVectorComparator.MAX_SIM),
                                  quantization_config=quant() if quant else None, on_disk=True if quant else None)},
            optimizers_config=m.OptimizersConfigDiff(indexing_threshold=1) if quant else None)
        if self.where != ":memory:":  # the client's local mode has no payload indexes (and says so)
            self._call(self.client.create_payload_index, name, "row", m.PayloadSchemaType.INTEGER)

    def drop(self, name: str) -> None:
        self._call(self.client.delete_collection, name)

    def upsert_global(self, name: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        for part, vecs in _split(ids, vectors):
            self._call(self.client.upsert, name, [self.m.PointStruct(id=i, vector={GLOBAL: v.tolist()},
                                                                     payload={"row": i}) for i, v in zip(part, vecs)])

    def set_local(self, name: str, ids: list[int], vectors: list[np.ndarray]) -> None:
        self._call(self.client.update_vectors, name,
                   [self.m.PointVectors(id=i, vector={LOCAL: v.tolist()}) for i, v in zip(ids, vectors)])

    def delete(self, name: str, ids: list[int]) -> None:
        self._call(self.client.delete, name, self.m.PointIdsList(points=ids))

    def _convert(self, node: Any) -> Any:
        m = self.m
        if isinstance(node, Clause):
            parts = {k: [self._convert(c) for c in getattr(node, k)] or None for k in ("must", "should", "must_not")}
            return m.Filter(**parts)
        if isinstance(node, Match):
            return m.FieldCondition(key=node.key, match=m.MatchValue(value=node.value))
        if isinstance(node, AnyOf):
            return m.FieldCondition(key=node.key, match=m.MatchAny(any=list(node.values)))
        if isinstance(node, Range):
            return m.FieldCondition(key=node.key, range=m.Range(gt=node.gt, gte=node.gte, lt=node.lt, lte=node.lte))
        if isinstance(node, Ids):
            return m.HasIdCondition(has_id=list(node.ids))
        if isinstance(node, HasVector):
            return m.HasVectorCondition(has_vector=node.name)
        raise TypeError(f"not a filter node: {type(node).__name__}")

    def _below(self, below: int | None, where: Clause | None = None) -> Any:
        must = ([] if below is None else [Range("row", lt=below)]) + ([] if where is None else [where])
        return self._convert(Clause(must=must)) if must else None

    def count(self, name: str, below: int | None, where: Clause | None = None) -> int:
        return int(self._call(self.client.count, name, count_filter=self._below(below, where), exact=True).count)

    def ids(self, name: str, below: int | None, where: Clause | None = None) -> np.ndarray:
        out, offset = [], None
        while True:
            records, offset = self._call(self.client.scroll, name, scroll_filter=self._below(below, where),
                                         limit=10_000, offset=offset, with_payload=False, with_vectors=False)
            out += [int(r.id) for r in records]
            if offset is None:
                return np.sort(np.array(out, dtype=np.int64))

    def scan(self, name: str, below: int | None, which: list[str], where: Clause | None = None
             ) -> Iterable[tuple[int, dict[str, np.ndarray]]]:
        offset = None
        while True:
            records, offset = self._call(self.client.scroll, name, scroll_filter=self._below(below, where),
                                         limit=1_000, offset=offset, with_payload=False, with_vectors=which)
            for r in records:
                yield int(r.id), {w: np.asarray(v, dtype=np.float32) for w, v in (r.vector or {}).items()}
            if offset is None:
                return

    def set_payload(self, name: str, payloads: dict[int, dict[str, Any]]) -> None:
        m, items = self.m, list(payloads.items())
        for start in range(0, len(items), BATCH):
            self._call(self.client.batch_update_points, name, [
                m.OverwritePayloadOperation(overwrite_payload=m.SetPayload(payload=p, points=[int(i)]))
                for i, p in items[start : start + BATCH]])

    def index_payload(self, name: str, kinds: dict[str, str]) -> None:
        if self.where == ":memory:":  # the client's local mode has no payload indexes (and says so)
            return
        m = self.m
        schema = {"keyword": m.PayloadSchemaType.KEYWORD, "float": m.PayloadSchemaType.FLOAT,
                  "integer": m.PayloadSchemaType.INTEGER}
        for key, kind in kinds.items():
            self._call(self.client.create_payload_index, name, key, schema[kind])

    def vectors(self, name: str, ids: list[int], which: str) -> dict[int, np.ndarray]:
        records = self._call(self.client.retrieve, name, ids, with_payload=False, with_vectors=[which])
        return {int(r.id): np.asarray(r.vector[which], dtype=np.float32) for r in records
                if r.vector and which in r.vector}  # a point without this vector (an item without tokens): left out

    def flush(self, name: str) -> None:
        pass  # the server persists its own writes

    def disk_bytes(self, name: str) -> dict[str, int] | None:
        return None  # on the server's disk

    def nearest(self, name: str, queries: np.ndarray, k: int, below: int | None, where: Clause | None = None
                ) -> list[tuple[np.ndarray, np.ndarray]]:
        m = self.m
        requests = [m.QueryRequest(query=q.tolist(), using=GLOBAL, limit=k, filter=self._below(below, where))
                    for q in queries]
        return [_unpack(r.points) for r in self._call(self.client.query_batch_points, name, requests)]

    def fused(self, name: str, queries: np.ndarray, words: list[np.ndarray], weights: list[float], candidates: int,
              k: int, below: int | None, quantized: bool = False, where: Clause | None = None
              ) -> list[tuple[np.ndarray, np.ndarray]]:
        m = self.m
        params = m.SearchParams(quantization=m.QuantizationSearchParams(rescore=False)) if quantized else None
        requests = []
        for query, word_vectors, weight in zip(queries, words, weights):
            first = m.Prefetch(query=query.tolist(), using=GLOBAL, limit=candidates,
                               filter=self._below(below, where))
            local = m.Prefetch(query=word_vectors.tolist(), using=LOCAL, limit=candidates, prefetch=[first],
                               params=params)
            formula = m.FormulaQuery(formula=m.SumExpression(sum=["$score[0]",
                                                                  m.MultExpression(mult=[weight, "$score[1]"])]))
            requests.append(m.QueryRequest(query=formula, prefetch=[first, local], limit=k))
        return [_unpack(r.points) for r in self._call(self.client.query_batch_points, name, requests)]


def describe_url(url: str) -> str:
    """``host:port`` of a Qdrant URL, without any user name or password in it (for messages)."""
    if url == ":memory:":
        return url
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"


def check_url(url: str) -> None:
    """Raise ValueError when ``url`` is not an http(s) URL with a host."""
    if url == ":memory:":
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises on a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("--qdrant-url must be an http:// or https:// URL with a host, e.g. http://localhost:6333")


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


_ENGINES: dict[tuple[str, str], Engine] = {}


def engine(connection: dict[str, Any]) -> Engine:
    """The engine of a connection entry (``{"path": DIR}`` or ``{"url": URL, "api_key_env": NAME}``), one per
    process: an embedded shard can be open only once."""
    if connection.get("path"):
        key = ("path", str(Path(connection["path"]).resolve()))
        if key not in _ENGINES:
            _ENGINES[key] = EdgeEngine(key[1])
    else:
        key = ("url", str(connection.get("url")))
        if key not in _ENGINES:
            check_url(key[1])
            _ENGINES[key] = ClientEngine(key[1], connection.get("api_key_env") or API_KEY_ENV)
    return _ENGINES[key]


def release() -> None:
    """Close every engine this process opened (embedded shards are unlocked for other processes)."""
    for eng in _ENGINES.values():
        if isinstance(eng, EdgeEngine):
            for shard in eng.shards.values():
                shard.close()
    _ENGINES.clear()
