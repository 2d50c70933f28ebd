"""The HTTP routes: the search API (behind the API key when one is set) and the open ones (page, health).

The gate (:mod:`service.gate`) has already checked the key and bounded the body before a route runs;
``require_api_key`` checks it again for every route of the API router, so a route added there can never be
left open by a change to the gate's list of open paths.
"""

from __future__ import annotations

import mimetypes
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from alignsearch.indexer.filters import FilterError
from alignsearch.indexer.photo_fields import FieldError
from alignsearch.indexer.search import Hit, Searcher, SearchResult

from . import errors as errors_module
from . import schemas
from .admission import Lanes, overloaded
from .auth import has_api_key
from .errors import ErrorBody
from .files import NotServable, chunks, open_recorded
from .pipeline import ImageQuery, SimilarQuery, TextQuery
from .state import AppState
from .uploads import ALLOWED_NAMES, read_similar, read_upload, upload_fields
from .writes import Unreadable, Writer

STATIC = Path(__file__).resolve().parent / "static"
FEATURES_ONLY = "this index was built from precomputed region features"
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp")

_DESCRIPTIONS = {
    400: "malformed request (bad base64, a malformed body or header), or an image query to an index built from "
         "precomputed region features",
    408: "the request body stopped arriving",
    401: "missing or wrong API key (`Authorization: Bearer KEY`)",
    403: "writes are off: the server has no API key and was not started with --allow-writes",
    404: "no such image",
    413: "body, image file or image dimensions over the server's limits",
    415: f"not multipart or JSON, or not a {ALLOWED_NAMES} image",
    422: "a field is missing or out of range, or the filter does not fit the index's fields (the answer lists "
         "which; the input is never copied)",
    503: "busy (queue full), over the time limit, or loading; retry after `Retry-After` seconds",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error codes."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


def _upload_request_body(fields_model: Any, json_model: Any, what: str, json_first: bool = False) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of a search that takes an uploaded ``what`` as a multipart ``file`` with
    ``fields_model``'s form fields, or a JSON body of ``json_model`` (listed first when ``json_first``)."""
    fields = fields_model.model_json_schema()
    form = {"type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": f"the {what} ({ALLOWED_NAMES})"}, **fields["properties"]}}
    content = [("multipart/form-data", {"schema": form}),
               ("application/json", {"schema": json_model.model_json_schema()})]
    return {"requestBody": {"required": True, "content": dict(content[::-1] if json_first else content)}}


# -- dependencies (async: each is a few attribute reads, and a plain `def` would cost a thread hop a request) --

async def get_state(request: Request) -> AppState:
    return request.app.state.alignsearch


async def get_searcher(state: AppState = Depends(get_state)) -> Searcher:
    """The index version current now (requests that started earlier finish on theirs)."""
    if state.follower is None:
        raise overloaded("the index is not loaded yet")
    return state.follower.searcher


async def require_api_key(authorized: bool = Depends(has_api_key)) -> None:
    if not authorized:
        raise HTTPException(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                            headers={"WWW-Authenticate": "Bearer"})


# -- helpers -------------------------------------------------------------------------------------------------

def _timings(result: SearchResult, started: float) -> dict[str, float]:
    t = dict(result.timings_ms)
    t["total"] = round((time.perf_counter() - started) * 1000.0, 3)
    return {k: t.get(k, 0.0) for k in ("encode", "coarse", "rerank", "total")}


def _image_result(rank: int, hit: Hit) -> schemas.ImageResult:
    fields = dict(rank=rank, id=hit.id, score=hit.score, global_score=hit.global_score, local_score=hit.local_score,
                  uri=f"/images/{quote(hit.id)}", metadata=hit.metadata, grounding=hit.grounding, match=hit.match,
                  relevance=hit.relevance)
    if hit.grounding is None:  # the search's own values, of the declared types: not validated once more per hit
        return schemas.ImageResult.model_construct(**fields)
    return schemas.ImageResult(**fields)  # groundings become their model


def _caption_result(rank: int, hit: Hit) -> schemas.CaptionResult:
    return schemas.CaptionResult(rank=rank, id=hit.id, caption=hit.caption or "", image_id=hit.image_id,
                                 score=hit.score, global_score=hit.global_score, local_score=hit.local_score,
                                 metadata=hit.metadata, grounding=hit.grounding, match=hit.match,
                                 relevance=hit.relevance)


def _filter_error(exc: FilterError) -> HTTPException:
    """A 422 in the shape of the validation errors: where in the filter, and what is wrong."""
    loc: list[Any] = ["body"]
    for part in exc.loc.replace("]", "").split("."):
        name, _, index = part.partition("[")
        loc += [name] + ([int(index)] if index else [])
    return HTTPException(422, [{"loc": loc, "msg": errors_module.clean_errors([{"msg": exc.message}])[0]["msg"],
                                "type": "filter"}])


async def _check_filter(searcher: Searcher, collection: str, filter_: Any) -> None:
    """Refuse a filter this index cannot run before the search is queued (its allowed rows are then cached for
    the search); the SQLite work runs off the event loop."""
    if filter_ is None:
        return
    try:
        await run_in_threadpool(searcher.index.allowed, collection, filter_)
    except FilterError as exc:
        raise _filter_error(exc) from None


def _page(result: SearchResult) -> dict[str, Any]:
    return {"offset": result.offset, "total": result.total, "has_more": result.has_more,
            "next_offset": result.offset + len(result.hits) if result.has_more else None}


def _found(result: SearchResult | FilterError) -> SearchResult:
    if isinstance(result, FilterError):
        raise _filter_error(result)
    return result


def _lanes(state: AppState, name: str) -> Lanes:
    lanes = state.lanes.get(name)
    if lanes is None:
        raise overloaded("the server is starting")
    return lanes


# -- the API (behind the key) ---------------------------------------------------------------------------------

api = APIRouter(dependencies=[Depends(require_api_key)])


@api.post("/search/text", response_model=schemas.TextSearchResponse, summary="ranked images for a sentence",
          responses=errors(400, 401, 408, 413, 422, 503))
async def search_text(req: schemas.TextSearchRequest, state: AppState = Depends(get_state),
                      searcher: Searcher = Depends(get_searcher)) -> schemas.TextSearchResponse:
    started = time.perf_counter()
    await _check_filter(searcher, "images", req.filter)
    result = _found(await _lanes(state, "text").run(TextQuery(req), req.ranked, req.k))
    timings = _timings(result, started)
    state.metrics.observe_stages("/search/text", timings)
    return schemas.TextSearchResponse(query=req.query, truncated=result.truncated, timings_ms=timings,
                                      results=[_image_result(result.offset + i + 1, h)
                                               for i, h in enumerate(result.hits)],
                                      min_score=result.min_score, match_test=result.match_test,
                                      no_match=result.no_match, **_page(result))


@api.post("/search/image", response_model=schemas.ImageSearchResponse,
          summary="ranked captions for an image (multipart field 'file', or JSON 'image_base64')",
          responses=errors(400, 401, 408, 413, 415, 422, 503),
          openapi_extra=_upload_request_body(schemas.ImageSearchFields, schemas.ImageSearchJSON, "image"))
async def search_image(request: Request, state: AppState = Depends(get_state),
                       searcher: Searcher = Depends(get_searcher)) -> schemas.ImageSearchResponse:
    started = time.perf_counter()
    if not searcher.model.takes_images:
        raise HTTPException(400, FEATURES_ONLY + ": its model cannot read an uploaded image; search it with text "
                                 "(/search/text)")
    data, params = await read_upload(request, state.settings.max_upload_bytes)
    lanes = _lanes(state, "image")
    lanes.lane(params.ranked, params.k)  # refused before the decode when over the limit or busy
    await _check_filter(searcher, "captions", params.filter)
    image = await state.decoder.decode(data)
    result = _found(await lanes.run(ImageQuery(image, params), params.ranked, params.k))
    timings = _timings(result, started)
    state.metrics.observe_stages("/search/image", timings)
    return schemas.ImageSearchResponse(timings_ms=timings, **_page(result),
                                       results=[_caption_result(result.offset + i + 1, h)
                                                for i, h in enumerate(result.hits)],
                                       min_score=result.min_score, match_test=result.match_test,
                                       no_match=result.no_match)


@api.post("/search/similar", response_model=schemas.SimilarSearchResponse,
          summary="photos like an indexed photo (JSON 'id') or an uploaded one (multipart 'file' or JSON "
                  "'image_base64'), by the cosine of their global vectors; the photo itself is left out",
          responses=errors(400, 401, 404, 408, 413, 415, 422, 503),
          openapi_extra=_upload_request_body(schemas.SimilarFields, schemas.SimilarJSON, "photo", json_first=True))
async def search_similar(request: Request, state: AppState = Depends(get_state),
                         searcher: Searcher = Depends(get_searcher)) -> schemas.SimilarSearchResponse:
    started = time.perf_counter()
    image_id, data, params = await read_similar(request, state.settings.max_upload_bytes)
    lanes = _lanes(state, "similar")
    lanes.lane(params.ranked, params.k)  # refused before any decode when over the limit or busy
    await _check_filter(searcher, "images", params.filter)
    image = None
    if image_id is not None:
        if searcher.get_image(image_id) is None:
            raise HTTPException(404, "no indexed image has this id")
    else:
        image = await state.decoder.decode(data)
    result = await lanes.run(SimilarQuery(image_id, image, params), params.ranked, params.k)
    if isinstance(result, KeyError):
        raise HTTPException(404, "no indexed image has this id")
    result = _found(result)
    timings = _timings(result, started)
    state.metrics.observe_stages("/search/similar", timings)
    return schemas.SimilarSearchResponse(timings_ms=timings, **_page(result),
                                         results=[_image_result(result.offset + i + 1, h)
                                                  for i, h in enumerate(result.hits)])


@api.get("/images/{image_id:path}", summary="an indexed image", response_class=FileResponse,
         responses={200: {"description": "the image file as indexed",
                          "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES}},
                    **errors(401, 404)})
async def get_image(image_id: str, searcher: Searcher = Depends(get_searcher)) -> StreamingResponse:
    row = searcher.get_image(image_id)
    if row is None:
        raise HTTPException(404, "no indexed image has this id")
    try:  # the index's own record, under its images root, never through a symlink (service/files.py)
        fh, info = open_recorded(searcher.index.images_root, row["path"])
    except NotServable:
        if not searcher.model.takes_images:
            raise HTTPException(404, FEATURES_ONLY + ": it has no photo file for this image (build it with --images "
                                     "too to serve photos)") from None
        raise HTTPException(404, "the file of this image is not available") from None
    media = mimetypes.guess_type(row["path"])[0] or "application/octet-stream"
    return StreamingResponse(chunks(fh), media_type=media, headers={"content-length": str(info.st_size)})


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


def get_writer(state: AppState = Depends(get_state)) -> Writer:
    """The writer, when writes are on: the server has an API key (already checked), or --allow-writes."""
    if not state.settings.api_key and not state.settings.allow_writes:
        raise HTTPException(403, "writes are off: start the server with an API key (--api-key) or --allow-writes")
    if state.writer is None:
        raise overloaded("the index is not loaded yet")
    return state.writer


def _fields_shown(state: AppState, image_id: str) -> dict[str, Any]:
    searcher = state.follower.searcher
    row = searcher.index.image_by_id(image_id)
    return searcher.index.fields_of([row["row"]]).get(row["row"], {}) if row else {}


@api.post("/images", status_code=201, response_model=schemas.Written, responses=errors(400, 401, 403, 413, 415, 422, 503),
          summary="add a photo (multipart 'file', optional 'captions': a JSON list of strings, 'metadata': a JSON "
                  "object of fields); searchable when this answers 201 (200: the photo was already indexed)")
async def add_image(request: Request, state: AppState = Depends(get_state), writer: Writer = Depends(get_writer)
                    ) -> JSONResponse:
    data, image_format, captions, fields = await upload_fields(request, state.settings.max_upload_bytes)
    await state.decoder.decode(data)  # the search uploads' limits and checks: a photo that decodes
    try:
        image_id, created = await writer.add(data, image_format, captions, fields)
    except FieldError as exc:
        raise HTTPException(422, str(exc)) from None
    except Unreadable:  # only the photo's own failure is the client's; an index that cannot be updated is not
        raise HTTPException(415, "the photo could not be read for indexing") from None
    except OSError:
        raise HTTPException(503, "the server could not store the photo (its images folder is not writable)") from None
    body = schemas.Written(id=image_id, uri=f"/images/{quote(image_id)}", created=created,
                           metadata=_fields_shown(state, image_id))
    return JSONResponse(body.model_dump(), status_code=201 if created else 200)


@api.delete("/images/{image_id:path}", response_model=schemas.Deleted, responses=errors(401, 403, 404, 503),
            summary="remove a photo and its captions from the index (no search returns it after this answer)")
async def delete_image(image_id: str, writer: Writer = Depends(get_writer),
                       searcher: Searcher = Depends(get_searcher)) -> schemas.Deleted:
    if searcher.get_image(image_id) is None:
        raise HTTPException(404, "no indexed image has this id")
    report = await writer.delete(image_id)
    if report["images_deleted"] == 0:
        raise HTTPException(404, "no indexed image has this id")
    return schemas.Deleted(id=image_id, captions_deleted=report["captions_deleted_with_images"])


@api.patch("/images/{image_id:path}/metadata", response_model=schemas.Written, responses=errors(401, 403, 404, 422, 503),
           summary="replace the named fields of a photo (JSON object; null or [] removes a field)")
async def patch_metadata(image_id: str, fields: dict[str, Any], state: AppState = Depends(get_state),
                         writer: Writer = Depends(get_writer), searcher: Searcher = Depends(get_searcher)
                         ) -> schemas.Written:
    if searcher.get_image(image_id) is None:
        raise HTTPException(404, "no indexed image has this id")
    try:
        report = await writer.set_fields(image_id, {k: _as_values(v) for k, v in fields.items()})
    except FieldError as exc:
        raise HTTPException(422, str(exc)) from None
    if not report["updated"]:
        raise HTTPException(404, "no indexed image has this id")
    return schemas.Written(id=image_id, uri=f"/images/{quote(image_id)}", created=False,
                           metadata=_fields_shown(state, image_id))


def _as_values(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


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
