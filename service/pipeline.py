"""What one micro-batch runs (in a worker thread): one encoder forward for all its queries, then the search
per group of equal parameters (k, candidates, explain, offset, filter), on the searcher that is current when
the batch starts. A group whose filter this index cannot run gets the :class:`FilterError` as its result (the
route answers 422), not the whole batch."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from alignsearch.indexer.filters import FilterError, canonical
from alignsearch.indexer.search import Searcher, SearchResult

from . import schemas


@dataclass
class TextQuery:
    request: schemas.TextSearchRequest


@dataclass
class ImageQuery:
    image: Image.Image
    params: schemas.ImageSearchFields


def _grouped(params: list[schemas.SearchParams]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        explain = getattr(p, "explain", False)
        groups[(p.k, p.candidates, explain, p.offset, None if p.filter is None else canonical(p.filter))].append(i)
    return groups


def _run_batch(encode, search, inputs: list[Any], params: list[schemas.SearchParams]
               ) -> list[SearchResult | FilterError]:
    start = time.perf_counter()
    enc = encode(inputs)
    encode_ms = round((time.perf_counter() - start) * 1000.0, 3)
    results: list[SearchResult | FilterError | None] = [None] * len(inputs)
    for (k, candidates, explain, offset, _), idx in _grouped(params).items():
        try:
            found = search(enc.select(idx), k, candidates, explain, None, params[idx[0]].filter, offset)
        except FilterError as exc:  # the index changed under a checked filter: this group's answer only
            results = [exc if i in idx else r for i, r in enumerate(results)]
            continue
        for i, res in zip(idx, found):
            res.timings_ms["encode"] = encode_ms
            results[i] = res
    return results  # type: ignore[return-value]


def _marked(searcher: Searcher, results: list[Any], min_scores: list[float | None]) -> list[Any]:
    """The results with their hits marked as matches or weak hits (:meth:`Searcher.mark_all`, the whole batch at
    once); errors as they are."""
    found = [i for i, r in enumerate(results) if isinstance(r, SearchResult)]
    searcher.mark_all([results[i] for i in found], [min_scores[i] for i in found])
    return results


def text_batch(searcher: Searcher, queries: list[TextQuery]) -> list[SearchResult | FilterError]:
    """Sentences -> ranked images, marked with the request's ``min_score`` or the model's match test."""
    results = _run_batch(searcher.model.encode_texts, searcher.search_text_encoded,
                         [q.request.query for q in queries], [q.request for q in queries])
    return _marked(searcher, results, [q.request.min_score for q in queries])


def image_batch(searcher: Searcher, queries: list[ImageQuery]) -> list[SearchResult | FilterError]:
    """Images -> ranked captions, without captions whose image was deleted from the index, marked by the model's
    match test."""
    results = _run_batch(searcher.model.encode_images, searcher.search_image_encoded, [q.image for q in queries],
                         [q.params for q in queries])
    live: dict[str, bool] = {}
    for result in results:
        if isinstance(result, FilterError):
            continue
        for hit in result.hits:
            if hit.image_id is not None and hit.image_id not in live:
                live[hit.image_id] = searcher.get_image(hit.image_id) is not None
        result.hits = [h for h in result.hits if h.image_id is None or live[h.image_id]]
    return _marked(searcher, results, [None] * len(results))


@dataclass
class SimilarQuery:
    image_id: str | None
    image: Image.Image | None
    params: schemas.SimilarFields


def similar_batch(searcher: Searcher, queries: list[SimilarQuery]) -> list[SearchResult | Exception]:
    """Photos (indexed ones by id, uploaded ones encoded in one forward) -> the most similar indexed photos.
    A query whose id is no longer live gets a KeyError, one whose filter no longer fits a FilterError."""
    start = time.perf_counter()
    uploads = [i for i, q in enumerate(queries) if q.image is not None]
    encoded = searcher.model.encode_images([queries[i].image for i in uploads]) if uploads else None
    encode_ms = round((time.perf_counter() - start) * 1000.0, 3) if uploads else 0.0
    results: list[SearchResult | Exception] = []
    for i, q in enumerate(queries):
        p = q.params
        try:
            if q.image is not None:
                enc, exclude = encoded.select([uploads.index(i)]), [None]
            else:
                enc, exclude = searcher.similar_queries([q.image_id])
            result = searcher.search_similar_encoded(enc, p.k, p.filter, p.offset, exclude)[0]
        except (KeyError, FilterError) as exc:
            results.append(exc)
            continue
        result.timings_ms["encode"] = encode_ms
        results.append(result)
    return results


def on_current(get: Callable[[], Searcher], batch: Callable[[Searcher, list[Any]], list[SearchResult]]
               ) -> Callable[[list[Any]], list[SearchResult]]:
    """A batch function that runs on the searcher current when each batch starts."""
    return lambda queries: batch(get(), queries)
