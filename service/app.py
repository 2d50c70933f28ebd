"""The FastAPI application: two-stage search over an index built by ``alignsearch index build``."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import time
from collections import defaultdict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from indexer.search import Hit, SearchResult, Searcher
from models.preprocess import ImageDecodeError, ImageTooLarge, load_image

from . import schemas
from .batching import MicroBatcher
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("alignsearch.service")
STATIC = Path(__file__).resolve().parent / "static"


@dataclass
class TextQuery:
    request: schemas.TextSearchRequest


@dataclass
class ImageQuery:
    image: Image.Image
    params: schemas.ImageSearchJSON | schemas.SearchParams
    explain: bool = False


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    searcher: Searcher | None = None
    text_batcher: MicroBatcher | None = None
    image_batcher: MicroBatcher | None = None


# -- batch processing (runs in a worker thread) --------------------------------------------------------------

def _grouped(params: list[tuple[int, int, bool]]) -> dict[tuple[int, int, bool], list[int]]:
    groups: dict[tuple[int, int, bool], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[p].append(i)
    return groups


def _run_batch(encode, search, inputs: list[Any], params: list[tuple[int, int, bool]]) -> list[SearchResult]:
    """One encoder forward for the whole batch, then the search per group of equal parameters."""
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
    return _run_batch(searcher.model.encode_texts, searcher.search_text_encoded, [q.request.query for q in queries],
                      [(q.request.k, q.request.candidates, q.request.explain) for q in queries])


def image_batch(searcher: Searcher, queries: list[ImageQuery]) -> list[SearchResult]:
    return _run_batch(searcher.model.encode_images, searcher.search_image_encoded, [q.image for q in queries],
                      [(q.params.k, q.params.candidates, q.explain) for q in queries])


# -- dependencies --------------------------------------------------------------------------------------------

def get_state(request: Request) -> AppState:
    return request.app.state.alignsearch


def get_searcher(state: AppState = Depends(get_state)) -> Searcher:
    if state.searcher is None:
        raise HTTPException(503, "the index is not loaded yet")
    return state.searcher


_bearer = HTTPBearer(auto_error=False)


def require_api_key(state: AppState = Depends(get_state),
                    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """When the server has an API key, requests must send ``Authorization: Bearer KEY``."""
    expected = state.settings.api_key
    if not expected:
        return
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                            headers={"WWW-Authenticate": "Bearer"})


# -- helpers -------------------------------------------------------------------------------------------------

def _timings(result: SearchResult, started: float) -> dict[str, float]:
    t = dict(result.timings_ms)
    t["total"] = round((time.perf_counter() - started) * 1000.0, 3)
    return {k: t.get(k, 0.0) for k in ("encode", "coarse", "rerank", "total")}


def _image_result(rank: int, hit: Hit) -> schemas.ImageResult:
    return schemas.ImageResult(rank=rank, id=hit.id, score=hit.score, global_score=hit.global_score,
                               local_score=hit.local_score, uri=f"/images/{quote(hit.id)}", metadata=hit.metadata,
                               grounding=hit.grounding, match=hit.match)


def _caption_result(rank: int, hit: Hit) -> schemas.CaptionResult:
    return schemas.CaptionResult(rank=rank, id=hit.id, caption=hit.caption or "", image_id=hit.image_id,
                                 score=hit.score, global_score=hit.global_score, local_score=hit.local_score,
                                 metadata=hit.metadata, grounding=hit.grounding)


async def _read_upload(request: Request, limit: int) -> tuple[bytes, dict[str, Any]]:
    """The image bytes and the search fields of a multipart or JSON request."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit * 4 // 3 + 65536:
        raise HTTPException(413, f"request body of {declared} bytes exceeds the {limit}-byte upload limit")
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise RequestValidationError([{"type": "missing", "loc": ("body", "file"),
                                           "msg": "multipart field 'file' (the image) is required", "input": None}])
        data = await upload.read(limit + 1)
        fields = {k: v for k, v in form.items() if k != "file"}
    elif ctype.startswith("application/json"):
        try:
            body = schemas.ImageSearchJSON.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None
        try:
            data = base64.b64decode(body.image_base64, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(400, "image_base64 is not valid base64") from None
        fields = body.model_dump(exclude={"image_base64"})
    else:
        raise HTTPException(415, "send multipart/form-data with a 'file' field, or JSON with 'image_base64'")
    if len(data) > limit:
        raise HTTPException(413, f"image exceeds the {limit}-byte upload limit")
    if not data:
        raise HTTPException(400, "the uploaded file is empty")
    return data, fields


# -- the app -------------------------------------------------------------------------------------------------

def create_app(settings: Settings | None = None, searcher: Searcher | None = None) -> FastAPI:
    """Build the app; the index is loaded at start-up unless a ready ``searcher`` is given."""
    state = AppState(settings or Settings(), searcher=searcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = state.settings
        if state.searcher is None:
            state.searcher = await asyncio.to_thread(Searcher.open, s.index, s.model, s.device)
        searcher_ = state.searcher
        state.text_batcher = MicroBatcher(lambda qs: text_batch(searcher_, qs), s.max_batch, s.batch_wait_ms,
                                          state.metrics.batch_size.labels("text").observe)
        state.image_batcher = MicroBatcher(lambda qs: image_batch(searcher_, qs), s.max_batch, s.batch_wait_ms,
                                           state.metrics.batch_size.labels("image").observe)
        await state.text_batcher.start()
        await state.image_batcher.start()
        yield
        await state.text_batcher.stop()
        await state.image_batcher.stop()

    app = FastAPI(title="alignsearch", version="0.1.0", lifespan=lifespan,
                  description="Fine-grained image-text search: a FAISS first stage on global vectors, "
                              "reranked by region-word alignment.")
    app.state.alignsearch = state

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        state.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    @app.post("/search/text", response_model=schemas.TextSearchResponse, dependencies=[Depends(require_api_key)],
              summary="ranked images for a sentence")
    async def search_text(req: schemas.TextSearchRequest, searcher: Searcher = Depends(get_searcher)):
        started = time.perf_counter()
        result = searcher.mark_matches(await state.text_batcher.submit(TextQuery(req)), req.min_score)
        timings = _timings(result, started)
        state.metrics.observe_stages("/search/text", timings)
        return schemas.TextSearchResponse(query=req.query, truncated=result.truncated, timings_ms=timings,
                                          results=[_image_result(i + 1, h) for i, h in enumerate(result.hits)],
                                          min_score=result.min_score, no_match=result.no_match)

    @app.post("/search/image", response_model=schemas.ImageSearchResponse, dependencies=[Depends(require_api_key)],
              summary="ranked captions for an image (multipart field 'file', or JSON 'image_base64')")
    async def search_image(request: Request, _: Searcher = Depends(get_searcher)):
        started = time.perf_counter()
        data, fields = await _read_upload(request, state.settings.max_upload_bytes)
        explain = str(fields.pop("explain", False)).lower() in ("1", "true", "yes", "on")
        try:
            params = schemas.SearchParams.model_validate(fields)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None
        try:
            image = await asyncio.to_thread(load_image, data, state.settings.max_pixels)
        except ImageTooLarge as exc:
            raise HTTPException(413, str(exc)) from None
        except ImageDecodeError as exc:
            raise HTTPException(415, f"the upload is not a decodable image: {exc}") from None
        result = await state.image_batcher.submit(ImageQuery(image, params, explain))
        timings = _timings(result, started)
        state.metrics.observe_stages("/search/image", timings)
        return schemas.ImageSearchResponse(timings_ms=timings,
                                           results=[_caption_result(i + 1, h) for i, h in enumerate(result.hits)])

    @app.get("/images/{image_id:path}", dependencies=[Depends(require_api_key)], summary="an indexed image")
    async def get_image(image_id: str, searcher: Searcher = Depends(get_searcher)):
        row = searcher.get_image(image_id)
        if row is None:
            raise HTTPException(404, f"no indexed image with id {image_id!r}")
        path = Path(row["file"])  # the index's own record: ids are looked up, never joined into paths
        if not path.is_file():
            raise HTTPException(404, f"the file of image {image_id!r} is not available")
        return FileResponse(path)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        """The search page (plain HTML + a small script; the API key, if any, is typed into the page)."""
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz", summary="the process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=schemas.Ready, summary="index and model loaded")
    async def readyz():
        if state.searcher is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        counts = state.searcher.index.manifest["counts"]
        return schemas.Ready(status="ready", index=str(state.searcher.index.folder),
                             model_fingerprint=state.searcher.model.fingerprint,
                             images=counts["images"], captions=counts["captions"])

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
