"""The FastAPI application: two-stage search over an index built by ``alignsearch index build``.

Requests pass, outermost first: metrics (every request counted by route template) -> the gate (API key,
then body size; see :mod:`service.gate`) -> FastAPI's routing (:mod:`service.routes`), with the error
handlers of :mod:`service.errors`; the API's docs pages come from :mod:`service.docs`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles

from alignsearch.indexer.search import Searcher

from . import docs, errors
from .admission import Lanes
from .auth import is_open
from .compute import compute_threads, lower_this_thread
from .follow import IndexFollower
from .gate import Gate
from .metrics import RequestMetrics
from .pipeline import image_batch, on_current, similar_batch, text_batch
from .routes import STATIC, api, public
from .settings import Settings
from .state import AppState
from .uploads import Decoder, ImageLimits, decode_side_for
from .writes import Writer

DECODE_QUEUE = 8


def _openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The generated schema, with bearer auth declared on the API's routes only when the server has a key."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        if settings.api_key:
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema.get("paths", {}).items():
                if not is_open(path.split("{", 1)[0] if "{" in path else path):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: Settings | None = None, searcher: Searcher | None = None) -> FastAPI:
    """Build the app; the index is loaded at start-up unless a ready ``searcher`` is given."""
    state = AppState(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = state.settings
        threads = compute_threads()
        threads.heavy.run(lower_this_thread, s.heavy_nice)  # cheap queries get the CPU first
        opened = searcher or await asyncio.get_running_loop().run_in_executor(
            threads.light, lambda: Searcher.open(s.index, s.model, s.device, rerank_precision=s.rerank_precision))
        follower = IndexFollower(opened.index.folder, opened, s.reload_interval_s,
                                 on_swap=lambda _: state.metrics.reloads.inc())
        current = lambda: follower.searcher  # noqa: E731  (read once per batch, when the batch starts)
        state.lanes = {
            "text": Lanes("text", on_current(current, text_batch), s, state.metrics.batch_size.labels("text").observe,
                          threads),
            "image": Lanes("image", on_current(current, image_batch), s,
                           state.metrics.batch_size.labels("image").observe, threads),
            "similar": Lanes("similar", on_current(current, similar_batch), s,
                             state.metrics.batch_size.labels("similar").observe, threads),
        }
        limits = ImageLimits(s.max_pixels, s.max_image_side, decode_side_for(opened.model), s.max_jpeg_scans,
                             s.max_decode_work)
        state.decoder = Decoder(limits, s.decode_workers, DECODE_QUEUE, s.decode_timeout_s, nice=s.heavy_nice)
        for name, lanes in state.lanes.items():
            await lanes.start()
            for lane_name, lane in (("light", lanes.light), ("heavy", lanes.heavy)):
                state.metrics.waiting.labels(f"{name}-{lane_name}").set_function(lambda lane=lane: lane.waiting)
        state.metrics.decoding.set_function(lambda: state.decoder.busy)
        state.metrics.decode_kills.set_function(lambda: state.decoder.pool.killed)
        state.metrics.decode_overrun.set_function(lambda: state.decoder.pool.max_overrun_s)
        state.metrics.decode_idle.set_function(lambda: state.decoder.pool.idle())
        state.follower = follower
        state.writer = Writer(follower, s.write_batch_ms / 1000, s.write_batch_max,
                              observe=state.metrics.write_group.observe, nice=s.heavy_nice)
        if s.api_key or s.allow_writes:
            await asyncio.get_running_loop().run_in_executor(threads.light, state.writer.sweep)
        await follower.start()
        try:
            yield
        finally:
            await follower.stop()
            state.writer.close()
            for lanes in state.lanes.values():
                await lanes.stop()
            state.decoder.close()

    app = FastAPI(title="alignsearch", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Fine-grained image-text search: a FAISS first stage on global vectors, "
                              "reranked by region-word alignment.")
    app.router.redirect_slashes = False  # /metrics/ is a 404, not a redirect to /metrics
    app.state.alignsearch = state
    errors.install(app)
    # the routers' routes themselves, not an include: ``app.routes`` then lists every route with its path on
    # any FastAPI version (newer ones wrap an included router in an object without one)
    app.router.routes.extend([*api.routes, *public.routes])
    docs.install(app)  # /docs and /redoc with their assets from this install, no CDN; mounted before /static
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Gate, settings=state.settings)
    app.add_middleware(RequestMetrics, metrics=state.metrics, routes=list(app.routes))  # added last: runs first
    app.openapi = lambda: _openapi(app, state.settings)  # type: ignore[method-assign]
    return app
