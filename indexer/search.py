"""The search pipeline, the one place a score is computed: encode -> coarse (FAISS) -> rerank (alignment).

The service, ``alignsearch eval`` and the benchmarks all call :class:`Searcher`. Coarse: the top
``candidates`` items by global inner product in the global store (FAISS) (tombstones skipped). Rerank
(:mod:`indexer.rerank`): the local vectors of the union of all queries' candidates are gathered and decoded
once, every query is scored against its own candidates in one batched matmul on the model's device with the
model's region-word alignment, and mixed with the global score as TGDT does: ``S = S_global + w * S_local``.

Filters (:mod:`indexer.filters`) are evaluated in SQLite to the allowed rows, and the coarse stage returns the
top ``candidates`` *allowed* rows by global score, so a filtered search equals the two-stage search of the
filtered collection alone (the rerank only ever sees allowed candidates). How the coarse stage finds them
depends on how many rows are allowed (:meth:`Searcher.coarse_filtered`). Pages: ``offset`` skips the first
ranks of the same ranking (the candidates grow to ``offset + k`` when fewer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from alignsearch.models import alignment
from alignsearch.models.factory import load_model
from alignsearch.models.model import AlignModel, EncoderOutput
from alignsearch.models.reference import COLLECTION_M, MatchRule, ReferenceBank, collection_score, relevance
from alignsearch.models.scoring import ScoringConfig, inner_products, rank
from alignsearch.models.words import content_words

from . import kernels
from .index import Allowed, Collection, Index, StoreFilter, check_model
from .rerank import Reranked, precision_dtype

EXACT_MAX = 2048  # allowed rows up to this many are scored exactly from their stored global vectors
SELECTOR_MAX_FRACTION = 0.25  # up to this share of the collection: the global store searches the allowed ids only


@dataclass
class Hit:
    row: int
    id: str
    score: float
    global_score: float
    local_score: float
    uri: str | None
    caption: str | None
    image_id: str | None
    metadata: dict[str, Any]
    grounding: list[dict[str, Any]] | None = None
    match: bool | None = None  # global_score >= the threshold :meth:`Searcher.mark_matches` applied
    relevance: float | None = None  # percent of the model's reference items this hit's global score beats


@dataclass
class SearchResult:
    hits: list[Hit]
    timings_ms: dict[str, float] = field(default_factory=dict)
    truncated: bool = False
    min_score: float | None = None  # the threshold on global_score :meth:`Searcher.mark_matches` applied, if any
    match_test: str | None = None  # what chose it: "reference", "min_score" (fixed) or None (no test)
    # the query's global scores against the model's reference bank (sorted ascending), when it has one
    reference: np.ndarray | None = field(default=None, repr=False)
    # the query's COLLECTION_M-th best global score in the collection searched (or what a filter allows); NaN
    # or None: not known (a single item, or a search path that does not measure it)
    collection: float | None = None
    query_is_text: bool = True  # text -> images; False: image -> captions
    offset: int = 0  # the rank (0-based) of the first hit
    total: int | None = None  # items the search ranks from: live items, or those the filter allows

    @property
    def has_more(self) -> bool:
        """More results follow this page (at ``offset + len(hits)``)."""
        return self.total is not None and self.offset + len(self.hits) < self.total

    @property
    def no_match(self) -> bool:
        """A threshold applied and no hit clears it: nothing matches the query."""
        return self.min_score is not None and not any(h.match for h in self.hits)


def _device_of(model: AlignModel) -> torch.device:
    """Where the model's parameters are (the rerank runs there too); CPU for a model without any."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


def _result(hits: list[Hit], coarse_ms: float, rerank_ms: float, enc: EncoderOutput | None = None,
            q: int = 0, offset: int = 0, total: int | None = None, reference: np.ndarray | None = None,
            query_is_text: bool = True, collection: np.ndarray | None = None) -> SearchResult:
    """A result with its stage timings; with ``enc``, whether query ``q``'s text was cut to the model's length;
    with ``reference`` and ``collection``, query ``q``'s row of the reference scores and its collection score."""
    return SearchResult(hits, {"coarse": coarse_ms, "rerank": rerank_ms, "total": round(coarse_ms + rerank_ms, 3)},
                        bool(enc.truncated[q]) if enc is not None and enc.truncated else False,
                        reference=None if reference is None else reference[q], query_is_text=query_is_text,
                        offset=offset, total=total, collection=None if collection is None else float(collection[q]))


def _collection_scores(scores_per_query: list[np.ndarray], m: int) -> np.ndarray:
    """Each query's ``m``-th best global score from its first-stage scores (NaN: fewer than 2)."""
    return np.array([collection_score(s, m) for s in scores_per_query], dtype=np.float64)


def _top(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of one query's (scores, rows): score descending, ties by row id."""
    if len(rows) > k:
        keep = np.argpartition(-scores, k - 1)[:k]
        cut = scores[keep].min()
        keep = np.flatnonzero(scores >= cut)  # every tie at the cut, so the row-id order decides among them
        scores, rows = scores[keep], rows[keep]
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]


class Searcher:
    """Two-stage search over an :class:`Index` with the model it was built with.

    ``scoring`` (alignment, local weight, LSE lambda) defaults to the model's; every search method takes a
    ``scoring`` that overrides it for that call (the index does not depend on it). ``rerank_precision``:
    ``auto`` (the fastest kernel measured on this machine, :mod:`indexer.kernels`), ``float32`` or ``float16``."""

    def __init__(self, index: Index, model: AlignModel, scoring: ScoringConfig | None = None,
                 rerank_precision: str = "auto") -> None:
        check_model(index.manifest, model)
        self.index = index
        self.model = model
        self.scoring = scoring or model.config.scoring()
        self.grid = model.region_grid()
        self.rerank_precision = rerank_precision
        # the rerank kernel this machine runs fastest on these codes, measured once per process (indexer/kernels.py)
        self.reranker, self.kernel_choice = kernels.choose(index.images.store, _device_of(model), rerank_precision,
                                                           self.scoring)

    @classmethod
    def open(cls, index_dir: str | Path, model: str | AlignModel | None = None, device: str = "auto",
             scoring: ScoringConfig | None = None, rerank_precision: str = "auto") -> "Searcher":
        """Open an index; ``model`` None loads the model named in its manifest."""
        precision_dtype(rerank_precision)  # a bad name fails before anything loads
        index = Index(index_dir)
        if model is None:
            source = index.manifest["model"].get("source")
            model = source if source and Path(source).is_dir() else None
        if not isinstance(model, AlignModel):
            model = load_model(model, device=device)
        return cls(index, model, scoring, rerank_precision)

    # -- public API -------------------------------------------------------------------------------------
    def search_text(self, queries: list[str], k: int = 10, candidates: int = 100, explain: bool = False,
                    scoring: ScoringConfig | None = None, filter: Any = None, offset: int = 0) -> list[SearchResult]:
        """Texts -> ranked images (of those ``filter`` allows; ranks ``offset + 1`` to ``offset + k``)."""
        start = time.perf_counter()
        enc = self.model.encode_texts(queries)
        return self._with_encode(self.search_text_encoded(enc, k, candidates, explain, scoring, filter, offset),
                                 _ms(start))

    def search_image(self, images: list[Image.Image], k: int = 10, candidates: int = 100, explain: bool = False,
                     scoring: ScoringConfig | None = None, filter: Any = None, offset: int = 0) -> list[SearchResult]:
        """Images -> ranked captions (of the images ``filter`` allows)."""
        start = time.perf_counter()
        enc = self.model.encode_images(images)
        return self._with_encode(self.search_image_encoded(enc, k, candidates, explain, scoring, filter, offset),
                                 _ms(start))

    def search_text_encoded(self, enc: EncoderOutput, k: int, candidates: int, explain: bool = False,
                            scoring: ScoringConfig | None = None, filter: Any = None, offset: int = 0
                            ) -> list[SearchResult]:
        """Encoded text queries -> ranked images (words are the query side)."""
        scoring = scoring or self.scoring
        allowed = self._allowed(self.index.images, filter)
        where = None if allowed is None else StoreFilter(filter, self.index.field_types, allowed)
        in_store = self._search_in_store(enc, self.index.images, k, candidates, explain, scoring, offset, where)
        if in_store is not None:
            return in_store
        return self._search(enc, self.index.images, k, candidates, explain, True, scoring, allowed, offset)

    def search_image_encoded(self, enc: EncoderOutput, k: int, candidates: int, explain: bool = False,
                             scoring: ScoringConfig | None = None, filter: Any = None, offset: int = 0
                             ) -> list[SearchResult]:
        """Encoded image queries -> ranked captions (words are the candidates' side). With ``filter``, only
        captions of the images it allows (standalone captions have no image, so a filter leaves them out)."""
        allowed = self._allowed(self.index.captions, filter)
        return self._search(enc, self.index.captions, k, candidates, explain, False, scoring or self.scoring,
                            allowed, offset)

    def _allowed(self, col: Collection, filter_: Any) -> Allowed | None:
        """The rows ``filter_`` allows (None: no filter); FilterError for a filter this index cannot run."""
        if filter_ is None:
            return None
        return self.index.allowed(col.name, filter_)

    def similar_queries(self, image_ids: list[str]) -> tuple[EncoderOutput, list[int]]:
        """The global vectors of indexed images (stored ones; the file encoded again where the store keeps none)
        as queries for :meth:`search_similar_encoded`, and their rows. KeyError for an id not live."""
        rows = []
        for image_id in image_ids:
            row = self.index.image_by_id(image_id)
            if row is None:
                raise KeyError(image_id)
            rows.append(int(row["row"]))
        col = self.index.images
        vectors = getattr(col.index, "vectors", None)
        if vectors is not None:
            emb = torch.from_numpy(np.ascontiguousarray(vectors(np.array(rows, dtype=np.int64)), dtype=np.float32))
            emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        else:
            paths = [self.index.images_root / self.index.image_by_id(i)["path"] for i in image_ids]
            emb = self.model.encode_images([Image.open(p).convert("RGB") for p in paths]).global_emb
        n = len(rows)
        return EncoderOutput(emb, torch.zeros(n, 1, emb.shape[1]), torch.zeros(n, 1, dtype=torch.bool)), rows

    def search_similar_encoded(self, enc: EncoderOutput, k: int, filter: Any = None, offset: int = 0,
                               exclude: list[int | None] | None = None) -> list[SearchResult]:
        """Images -> the most similar indexed images ("more like this"), by the cosine of their global vectors
        (exact among the allowed rows as the coarse stage is; no rerank), without each query's own row
        ``exclude[q]``. ``hit.score`` = ``hit.global_score``; ``local_score`` 0."""
        if k < 1 or offset < 0:
            raise ValueError("k must be >= 1, offset >= 0")
        col = self.index.images
        allowed = self._allowed(col, filter)
        exclude = exclude or [None] * len(enc)
        need = offset + k
        start = time.perf_counter()
        queries = enc.global_emb.numpy()
        if allowed is None:
            rows_per_query, scores_per_query = self.coarse(queries, col, need + 1)
        else:
            rows_per_query, scores_per_query = self.coarse_filtered(queries, col, need + 1, allowed)
        coarse_ms = _ms(start)
        results = []
        for q, (rows, scores) in enumerate(zip(rows_per_query, scores_per_query)):
            start = time.perf_counter()
            own = exclude[q]
            total = col.live if allowed is None else allowed.count
            if own is not None and (allowed is None or bool(allowed.contains(np.array([own]))[0])):
                total -= 1
            keep = rows != own if own is not None else np.ones(len(rows), dtype=bool)
            rows, scores = rows[keep], scores[keep]
            order = rank(scores, rows, need)[offset:]
            g = torch.from_numpy(np.ascontiguousarray(scores[order], dtype=np.float32))
            hits = self._hits(col.name, rows[order], g, g, torch.zeros_like(g))
            results.append(_result(hits, coarse_ms, _ms(start), offset=offset, total=total))
        return results

    @property
    def default_min_score(self) -> float | None:
        """The fixed ``min_score`` of a model folder calibrated before reference banks, or None."""
        value = (getattr(self.model, "calibration", None) or {}).get("min_score")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def reference_bank(self) -> ReferenceBank | None:
        """The model's reference bank (``reference.safetensors``), or None."""
        return getattr(self.model, "reference", None)

    def match_rule(self, query_is_text: bool) -> MatchRule | None:
        """The reference test's rule for text (``True``) or image queries from ``calibration.json``; None when
        the model has no bank or no rule for that side."""
        if self.reference_bank is None:
            return None
        rules = (getattr(self.model, "calibration", None) or {}).get("match") or {}
        return MatchRule.from_dict(rules.get("text" if query_is_text else "image")) if isinstance(rules, dict) else None

    def collection_m(self, query_is_text: bool) -> int:
        """How many best global scores of the collection the match test compares a hit with (its rule's
        ``collection_m``; ``COLLECTION_M`` for a rule without a collection test)."""
        rule = self.match_rule(query_is_text)
        return rule.collection_m if rule is not None and rule.uses_collection else COLLECTION_M

    def reference_scores(self, enc: EncoderOutput, query_is_text: bool) -> np.ndarray | None:
        """Queries x R global scores against the reference bank (each row sorted), or None without a bank."""
        bank = self.reference_bank
        return None if bank is None else bank.scores(enc.global_emb.float().numpy(), query_is_text)

    def mark_matches(self, result: SearchResult, min_score: float | None = None) -> SearchResult:
        """Tell matches from weak hits, in place: ``hit.match`` is ``global_score >= result.min_score``.

        The threshold is, in this order: ``min_score`` when given (a fixed one, ``match_test`` "min_score");
        else the model's match test when it has a bank and a rule for this side (``match_test`` "reference"):
        the query's own threshold from its scores against the reference photos (text queries) or captions
        (image queries) and, where the rule has a collection test, from its ``collection_m``-th best global
        score in the collection searched (:class:`models.reference.MatchRule`); else the fixed ``min_score`` of
        a model calibrated before banks; else none (``match`` None; also when the rule's only test cannot be
        measured, as a collection test on a single item). ``hit.relevance`` (percent of the reference items the
        hit beats) is set whenever the result carries reference scores. The global score is the measure
        because it does not grow with the query's length, as the local (sum over words) part of ``score``
        does. Hits and ranks are unchanged; ``result.no_match`` says if none clears the threshold."""
        return self.mark_all([result], [min_score])[0]

    def mark_all(self, results: list[SearchResult], min_scores: list[float | None]) -> list[SearchResult]:
        """:meth:`mark_matches` of a batch (each result with its request's ``min_score``): the thresholds of all
        the results that use the reference test are computed at once, each hit's relevance in one lookup per
        result."""
        thresholds: list[tuple[float | None, str | None]] = [(None, None)] * len(results)
        by_rule: dict[bool, list[int]] = {}
        for i, (result, min_score) in enumerate(zip(results, min_scores)):
            if min_score is not None:
                thresholds[i] = (float(min_score), "min_score")
            elif result.reference is not None and self.match_rule(result.query_is_text) is not None:
                by_rule.setdefault(result.query_is_text, []).append(i)
            elif self.default_min_score is not None:
                thresholds[i] = (self.default_min_score, "min_score")
        for query_is_text, idx in by_rule.items():  # one bank side: every reference row has its length
            collection = [np.nan if results[i].collection is None else results[i].collection for i in idx]
            values = self.match_rule(query_is_text).threshold(np.stack([results[i].reference for i in idx]),
                                                              np.asarray(collection, dtype=np.float64))
            for i, value in zip(idx, values):
                if np.isfinite(value):
                    thresholds[i] = (round(float(value), 6), "reference")
        for result, (threshold, test) in zip(results, thresholds):
            result.min_score, result.match_test = threshold, test
            ref = result.reference
            scores = np.array([hit.global_score for hit in result.hits], dtype=np.float64)
            beats = None if ref is None else [round(float(v), 1) for v in relevance(scores, ref)]
            for j, hit in enumerate(result.hits):
                hit.match = None if threshold is None else bool(hit.global_score >= threshold)
                hit.relevance = None if beats is None else beats[j]
        return results

    def get_image(self, image_id: str) -> dict[str, Any] | None:
        """Metadata of a live indexed image (with its absolute ``file``), or None."""
        row = self.index.image_by_id(image_id)
        if row is not None:
            row["file"] = str(self.index.images_root / row["path"])
        return row

    # -- stages -----------------------------------------------------------------------------------------
    def coarse(self, queries: np.ndarray, col: Collection, candidates: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Top ``candidates`` live rows per query by global inner product: (rows, scores) per query."""
        live = col.live
        if live == 0 or len(queries) == 0:
            return [np.zeros(0, np.int64)] * len(queries), [np.zeros(0, np.float32)] * len(queries)
        # tombstones the global store could not remove (FAISS HNSW) are still in it: fetch that many more,
        # then drop them
        held = col.index.count()
        stale = max(0, held - live)
        fetch = min(held, candidates + stale)
        scores, rows = col.search(queries, fetch)
        deleted = np.fromiter(col.deleted, dtype=np.int64, count=len(col.deleted)) if stale else None
        out_rows, out_scores = [], []
        for r, s in zip(rows, scores):
            keep = (r >= 0) & ~np.isin(r, deleted) if stale else r >= 0
            out_rows.append(r[keep][:candidates])
            out_scores.append(s[keep][:candidates])
        return out_rows, out_scores

    def coarse_filtered(self, queries: np.ndarray, col: Collection, candidates: int, allowed: Allowed
                        ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Top ``candidates`` *allowed* rows per query by global inner product: (rows, scores) per query.

        The way is chosen by how many rows are allowed: up to ``EXACT_MAX``, their stored vectors are scored
        exactly (cost: that many dot products); up to ``SELECTOR_MAX_FRACTION`` of the collection, the global
        store searches the allowed ids only (FAISS with an ID selector: flat, IVF and HNSW); beyond, the
        global store's top is widened until it holds ``candidates`` allowed rows (about ``candidates / share``
        fetched, doubled while short), which are kept. Flat indexes give the exact top in every way; an
        approximate index (IVF, HNSW) is as approximate as its unfiltered search, except the exact way."""
        n, want = allowed.count, min(candidates, allowed.count)
        if n == 0 or len(queries) == 0:
            return [np.zeros(0, np.int64)] * len(queries), [np.zeros(0, np.float32)] * len(queries)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if n <= EXACT_MAX:
            scores = inner_products(queries, col.index.vectors(allowed.rows))
            tops = [_top(s, allowed.rows, want) for s in scores]
            return [t[0] for t in tops], [t[1] for t in tops]
        search_ids = getattr(col.index, "search_ids", None)
        if search_ids is not None and n <= SELECTOR_MAX_FRACTION * max(col.live, 1):
            scores, rows = search_ids(queries, want, allowed.rows)
            found = [r[r >= 0] for r in rows]
            if all(len(f) >= want for f in found):
                return [f[:want] for f in found], [s[r >= 0][:want] for s, r in zip(scores, rows)]
        return self._widened(queries, col, want, allowed)

    def _widened(self, queries: np.ndarray, col: Collection, want: int, allowed: Allowed
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The global store's top, widened until each query has ``want`` allowed rows (or the store is done)."""
        held = col.index.count()
        share = allowed.count / max(held, 1)
        fetch = min(held, int(want / share * 1.25) + 16)
        while True:
            scores, rows = col.search(queries, fetch)
            keep = [allowed.contains(r) for r in rows]
            if fetch >= held or all(int(k.sum()) >= want for k in keep):
                return [r[k][:want] for r, k in zip(rows, keep)], [s[k][:want] for s, k in zip(scores, keep)]
            fetch = min(held, fetch * 2)

    def rerank(self, enc: EncoderOutput, col: Collection, rows_per_query: list[np.ndarray], query_is_text: bool,
               scoring: ScoringConfig | None = None) -> Reranked:
        """Local alignment scores of every query of ``enc`` against its candidates, in one batched pass."""
        return self.reranker.rerank(enc, col.store, rows_per_query, query_is_text, scoring or self.scoring)

    def _search(self, enc: EncoderOutput, col: Collection, k: int, candidates: int, explain: bool,
                query_is_text: bool, scoring: ScoringConfig, allowed: Allowed | None = None, offset: int = 0
                ) -> list[SearchResult]:
        if k < 1 or candidates < 1 or offset < 0:
            raise ValueError("k and candidates must be >= 1, offset >= 0")
        candidates = max(candidates, offset + k)
        m = self.collection_m(query_is_text)
        fetch = max(candidates, m)  # the match test's collection score needs the m best global scores
        total = col.live if allowed is None else allowed.count
        start = time.perf_counter()
        if allowed is None:
            rows_per_query, global_per_query = self.coarse(enc.global_emb.numpy(), col, fetch)
        else:
            rows_per_query, global_per_query = self.coarse_filtered(enc.global_emb.numpy(), col, fetch, allowed)
        collection = _collection_scores(global_per_query, m)
        if fetch > candidates:  # best first: the rerank sees the same candidates as without the extra fetch
            rows_per_query = [r[:candidates] for r in rows_per_query]
            global_per_query = [g[:candidates] for g in global_per_query]
        reference = self.reference_scores(enc, query_is_text)
        coarse_ms = _ms(start)
        start = time.perf_counter()
        reranked = self.rerank(enc, col, rows_per_query, query_is_text, scoring)
        global_scores = np.zeros(tuple(reranked.scores.shape), dtype=np.float32)  # padded like the local scores
        counts = np.array([len(g) for g in global_per_query])
        global_scores[np.arange(global_scores.shape[1])[None, :] < counts[:, None]] = np.concatenate(global_per_query or [np.zeros(0, np.float32)])
        g_all = torch.from_numpy(global_scores)
        fused_all = scoring.fuse(g_all, reranked.scores)
        batch_ms = _ms(start)  # the batch's gather and scoring, shared by its queries
        start = time.perf_counter()
        orders = [rank(fused_all[q, : len(rows)], rows, offset + k)[offset:] for q, rows in enumerate(rows_per_query)]
        hit_lists = self._hit_lists(col.name, [
            (rows[order], fused_all[q, order], g_all[q, order], reranked.scores[q, order])
            for q, (rows, order) in enumerate(zip(rows_per_query, orders))])  # one metadata lookup for the batch
        batch_ms += _ms(start)
        results = []
        for q, (rows, order, hits) in enumerate(zip(rows_per_query, orders, hit_lists)):
            start = time.perf_counter()
            if len(rows) == 0:
                results.append(_result([], coarse_ms, 0.0, enc, q, offset, total, reference, query_is_text,
                                       collection))
                continue
            if explain and len(hits):
                self._explain(enc, q, hits, *reranked.candidates(q, order), query_is_text)
            results.append(_result(hits, coarse_ms, round(batch_ms + _ms(start), 3), enc, q, offset, total,
                                   reference, query_is_text, collection))
        return results

    def _search_in_store(self, enc: EncoderOutput, col: Collection, k: int, candidates: int, explain: bool,
                         scoring: ScoringConfig, offset: int = 0, where: StoreFilter | None = None
                         ) -> list[SearchResult] | None:
        """Text -> images where the global store ranks by the fused score itself (Qdrant: prefetch on global,
        MAX_SIM on local, a formula; :mod:`indexer.qdrant_store`), of the rows ``where`` allows when given;
        None where it cannot, for this store, this scoring or this filter (then :meth:`_search` runs). Same
        hits, scores and groundings as :meth:`_search`."""
        search_fused = getattr(col.index, "search_fused", None)
        if search_fused is None:
            return None
        if k < 1 or candidates < 1 or offset < 0:
            raise ValueError("k and candidates must be >= 1, offset >= 0")
        reference = self.reference_scores(enc, True)
        total = col.live if where is None else where.allowed.count
        if not total:
            return [_result([], 0.0, 0.0, enc, q, offset, 0, reference) for q in range(len(enc.local))]
        start = time.perf_counter()
        words = [enc.local[q][enc.mask[q].bool()].numpy() for q in range(len(enc.local))]
        need = offset + k
        found = search_fused(enc.global_emb.numpy(), words, need, max(candidates, need), scoring,
                             **({} if where is None else {"where": where}))
        if found is None:
            return None
        rule = self.match_rule(True)
        collection = None
        if rule is not None and rule.uses_collection:  # the store ranked by the fused score: ask for the M best
            m = rule.collection_m
            collection = _collection_scores(self.coarse(enc.global_emb.numpy(), col, m)[1], m)
        store_ms = _ms(start)
        results = []
        for q, (rows, fused, g, local) in enumerate(found):
            start = time.perf_counter()
            order = rank(fused, rows, need)[offset:]
            hits = self._hits(col.name, rows[order], *(torch.from_numpy(x[order]) for x in (fused, g, local)))
            if explain and len(hits):
                self._explain(enc, q, hits, *col.store.gather(rows[order]), True)
            results.append(_result(hits, store_ms, _ms(start), enc, q, offset, total, reference,
                                   collection=collection))  # the store ranked: rerank = metadata
        return results

    def _hits(self, collection: str, rows: np.ndarray, fused: torch.Tensor, g: torch.Tensor,
              local: torch.Tensor) -> list[Hit]:
        return self._hit_lists(collection, [(rows, fused, g, local)])[0]

    def _hit_lists(self, collection: str, lists: list[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]]
                   ) -> list[list[Hit]]:
        """The hits of several queries, each (rows, fused, global, local scores), their metadata (and fields)
        read from SQLite in one lookup for all of them."""
        every = sorted({int(r) for rows, *_ in lists for r in rows.tolist()})
        meta = self.index.rows(collection, every)
        fields = self.index.fields_of(every) if collection == "images" and every else {}
        out = []
        for rows, fused, g, local in lists:
            hits = []
            for row, s, gs, ls in zip(rows.tolist(), fused.tolist(), g.tolist(), local.tolist()):
                m = meta[row]
                extra = m.get("extra", {})
                if collection == "images":
                    hits.append(Hit(row, m["id"], s, gs, ls, m["path"], None, None,
                                    {"width": m["width"], "height": m["height"], **extra, **fields.get(row, {})}))
                else:
                    hits.append(Hit(row, m["id"], s, gs, ls, None, m["text"], m["image_id"], extra))
            out.append(hits)
        return out

    def _explain(self, enc: EncoderOutput, q: int, hits: list[Hit], local: torch.Tensor, mask: torch.Tensor,
                 query_is_text: bool) -> None:
        """For each content word, its best region (grid cell when regions are a grid), similarity, confidence.

        Whole words, not word pieces, and no stopwords or punctuation (:mod:`models.words`); a word's region
        similarity is the mean over its pieces, its confidence a softmax over regions
        (:func:`models.alignment.whole_word_groundings`). The score is not affected: every piece still counts
        in it. For caption hits the word vectors are the decoded ones that ranked them; only the word strings
        are needed, from one tokenizer call for all hits."""
        caption_words = None if query_is_text else self.model.tokenize([h.caption or "" for h in hits]).words
        for i, hit in enumerate(hits):
            if query_is_text:
                pieces, w_local, w_mask = enc.words[q], enc.local[q], enc.mask[q]
                r_local, r_mask = local[i], mask[i]
            else:
                pieces, w_local, w_mask = caption_words[i], local[i], mask[i]
                r_local, r_mask = enc.local[q], enc.mask[q]
            vectors = w_local[w_mask.bool()][: len(pieces)]
            shown = [w for w in content_words(pieces) if max(w.pieces) < len(vectors)]
            regions, sims, confidence = alignment.whole_word_groundings(
                vectors, r_local, r_mask, [w.pieces for w in shown])
            hit.grounding = []
            for word, region, sim, conf in zip(shown, regions.tolist(), sims.tolist(), confidence.tolist()):
                entry: dict[str, Any] = {"word": word.text, "region": region, "similarity": round(sim, 4),
                                         "confidence": round(conf, 4)}
                if self.grid is not None:
                    entry["cell"] = [region // self.grid[1], region % self.grid[1]]
                    entry["grid"] = list(self.grid)
                hit.grounding.append(entry)

    @staticmethod
    def _with_encode(results: list[SearchResult], encode_ms: float) -> list[SearchResult]:
        for r in results:
            r.timings_ms["encode"] = encode_ms
            r.timings_ms["total"] = round(encode_ms + r.timings_ms["coarse"] + r.timings_ms["rerank"], 3)
        return results
