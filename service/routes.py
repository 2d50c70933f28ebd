"""The HTTP routes: the search API (behind the API key when one is set) and the open ones (page, health).

The gate (:mod:`service.gate`) has already checked the key and bounded the body before a route runs;
``require_api_key`` checks it again for every route of the API router, so a route added there can never be
left open by a change to the gate's list of open paths.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from alignsearch.indexer.search import Hit, Searcher, SearchResult

from . import schemas
from .admission import Lanes, overloaded
from .auth import has_api_key
from .errors import ErrorBody
from .pipeline import ImageQuery, TextQuery
from .state import AppState
from .uploads import ALLOWED_NAMES, read_upload

STATIC = Path(__file__).resolve().parent / "static"
FEATURES_ONLY = "this index was built from precomputed region features"
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp")

_DESCRIPTIONS = {
    400: "malformed request (bad base64, a malformed body or header), or an image query to an index built from "
         "precomputed region features",
    408: "the request body stopped arriving",
    401: "missing or wrong API key (`Authorization: Bearer KEY`)",
    404: "no such image",
    413: "body, image file or image dimensions over the server's limits",
    415: f"not multipart or JSON, or not a {ALLOWED_NAMES} image",
    422: "a field is missing or out of range (the answer lists which; the input is never copied)",
    503: "busy (queue full), over the time limit, or loading; retry after `Retry-After` seconds",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error codes."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


def _image_request_body() -> dict[str, Any]:
    fields = schemas.ImageSearchFields.model_json_schema()
    form = {"type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": f"the image ({ALLOWED_NAMES})"}, **fields["properties"]}}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form},
        "application/json": {"schema": schemas.ImageSearchJSON.model_json_schema()},
    }}}


# -- dependencies --------------------------------------------------------------------------------------------

def get_state(request: Request) -> AppState:
    return request.app.state.alignsearch


def get_searcher(state: AppState = Depends(get_state)) -> Searcher:
    """The index version current now (requests that started earlier finish on theirs)."""
    if state.follower is None:
        raise overloaded("the index is not loaded yet")
    return state.follower.searcher


def require_api_key(authorized: bool = Depends(has_api_key)) -> None:
    if not authorized:
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


def _lanes(state: AppState, name: str) -> Lanes:
    lanes = state.lanes.get(name)
    if lanes is None:
        raise overloaded("the server is starting")
    return lanes


# -- the API (behind the key) ---------------------------------------------------------------------------------

api = APIRouter(dependencies=[Depends(require_api_key)])


@api.post("/search/text", response_model=schemas.TextSearchResponse, summary="ranked images for a sentence",
          responses=errors(401, 408, 413, 422, 503))
async def search_text(req: schemas.TextSearchRequest, state: AppState = Depends(get_state),
                      searcher: Searcher = Depends(get_searcher)) -> schemas.TextSearchResponse:
    started = time.perf_counter()
    result = searcher.mark_matches(await _lanes(state, "text").run(TextQuery(req), req.candidates, req.k),
                                   req.min_score)
    timings = _timings(result, started)
    state.metrics.observe_stages("/search/text", timings)
    return schemas.TextSearchResponse(query=req.query, truncated=result.truncated, timings_ms=timings,
                                      results=[_image_result(i + 1, h) for i, h in enumerate(result.hits)],
                                      min_score=result.min_score, no_match=result.no_match)


@api.post("/search/image", response_model=schemas.ImageSearchResponse,
          summary="ranked captions for an image (multipart field 'file', or JSON 'image_base64')",
          responses=errors(400, 401, 408, 413, 415, 422, 503), openapi_extra=_image_request_body())
async def search_image(request: Request, state: AppState = Depends(get_state),
                       searcher: Searcher = Depends(get_searcher)) -> schemas.ImageSearchResponse:
    started = time.perf_counter()
    if not searcher.model.takes_images:
        raise HTTPException(400, FEATURES_ONLY + ": its model cannot read an uploaded image; search it with text "
                                 "(/search/text)")
    data, params = await read_upload(request, state.settings.max_upload_bytes)
    lanes = _lanes(state, "image")
    lanes.lane(params.candidates, params.k)  # refused before the decode when over the limit or busy
    image = await state.decoder.decode(data)
    result = await lanes.run(ImageQuery(image, params), params.candidates, params.k)
    timings = _timings(result, started)
    state.metrics.observe_stages("/search/image", timings)
    return schemas.ImageSearchResponse(timings_ms=timings,
                                       results=[_caption_result(i + 1, h) for i, h in enumerate(result.hits)])


@api.get("/images/{image_id:path}", summary="an indexed image", response_class=FileResponse,
         responses={200: {"description": "the image file as indexed",
                          "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES}},
                    **errors(401, 404)})
async def get_image(image_id: str, searcher: Searcher = Depends(get_searcher)) -> FileResponse:
    row = searcher.get_image(image_id)
    if row is None:
        raise HTTPException(404, "no indexed image has this id")
    path = Path(row["file"])  # the index's own record: ids are looked up, never joined into paths
    if not path.is_file():
        if not searcher.model.takes_images:
            raise HTTPException(404, FEATURES_ONLY + ": it has no photo file for this image (build it with --images "
                                     "too to serve photos)")
        raise HTTPException(404, "the file of this image is not available")
    return FileResponse(path)


@api.post("/admin/reload", response_model=schemas.Reloaded, responses=errors(401, 503),
          summary="swap to the index folder's newest version now (the server also checks every second)")
async def reload(state: AppState = Depends(get_state), _: Searcher = Depends(get_searcher)) -> schemas.Reloaded:
    swapped = await state.follower.check()
    counts = state.follower.searcher.index.manifest["counts"]
    return schemas.Reloaded(swapped=swapped, images=counts["images"], captions=counts["captions"],
                            error=state.follower.last_error)


@api.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse, responses=errors(401))
async def metrics(state: AppState = Depends(get_state)) -> PlainTextResponse:
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


# -- open: the page, liveness and readiness ---------------------------------------------------------------

public = APIRouter()


@public.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The search page (plain HTML + a small script; the API key, if any, is typed into the page)."""
    return FileResponse(STATIC / "index.html")


@public.get("/healthz", summary="the process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@public.get("/readyz", response_model=schemas.Ready, response_model_exclude_none=True,
            summary="index and model loaded: counts for anyone (the page shows them), the index's name and the "
                    "model's fingerprint only with the API key when one is set",
            responses={503: {"model": schemas.Ready, "description": "still loading"}})
async def readyz(state: AppState = Depends(get_state), authorized: bool = Depends(has_api_key)):
    if state.follower is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    searcher = state.follower.searcher
    counts = searcher.index.manifest["counts"]
    ready = schemas.Ready(status="ready", images=counts["images"], captions=counts["captions"])
    if authorized:
        ready.index, ready.model_fingerprint = searcher.index.folder.name, searcher.model.fingerprint
    return ready
