"""What one micro-batch runs (in a worker thread): one encoder forward for all its queries, then the search
per group of equal parameters, on the searcher that is current when the batch starts."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from alignsearch.indexer.search import Searcher, SearchResult

from . import schemas


@dataclass
class TextQuery:
    request: schemas.TextSearchRequest


@dataclass
class ImageQuery:
    image: Image.Image
    params: schemas.ImageSearchFields


def _grouped(params: list[tuple[int, int, bool]]) -> dict[tuple[int, int, bool], list[int]]:
    groups: dict[tuple[int, int, bool], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[p].append(i)
    return groups


def _run_batch(encode, search, inputs: list[Any], params: list[tuple[int, int, bool]]) -> list[SearchResult]:
    start = time.perf_counter()
    enc = encode(inputs)
    encode_ms = round((time.perf_counter() - start) * 1000.0, 3)
    results: list[SearchResult | None] = [None] * len(inputs)
    for (k, candidates, explain), idx in _grouped(params).items():
        for i, res in zip(idx, search(enc.select(idx), k, candidates, explain)):
            res.timings_ms["encode"] = encode_ms
            results[i] = res
    return results  # type: ignore[return-value]


def text_batch(searcher: Searcher, queries: list[TextQuery]) -> list[SearchResult]:
    """Sentences -> ranked images."""
    return _run_batch(searcher.model.encode_texts, searcher.search_text_encoded, [q.request.query for q in queries],
                      [(q.request.k, q.request.candidates, q.request.explain) for q in queries])


def image_batch(searcher: Searcher, queries: list[ImageQuery]) -> list[SearchResult]:
    """Images -> ranked captions, without captions whose image was deleted from the index."""
    results = _run_batch(searcher.model.encode_images, searcher.search_image_encoded, [q.image for q in queries],
                         [(q.params.k, q.params.candidates, q.params.explain) for q in queries])
    live: dict[str, bool] = {}
    for result in results:
        for hit in result.hits:
            if hit.image_id is not None and hit.image_id not in live:
                live[hit.image_id] = searcher.get_image(hit.image_id) is not None
        result.hits = [h for h in result.hits if h.image_id is None or live[h.image_id]]
    return results


def on_current(get: Callable[[], Searcher], batch: Callable[[Searcher, list[Any]], list[SearchResult]]
               ) -> Callable[[list[Any]], list[SearchResult]]:
    """A batch function that runs on the searcher current when each batch starts."""
    return lambda queries: batch(get(), queries)
