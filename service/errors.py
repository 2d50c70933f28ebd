"""Error answers: short, typed, and never a copy of the input.

FastAPI's default validation answer copies the rejected input into the error, which fails to encode for
NaN, Infinity, lone surrogates or bytes that are not UTF-8 (a 500), and echoes a 50 MB query back. Here an
error keeps only the location (field names the API knows; anything else, such as an unknown key, is shown
as ``*``), pydantic's message (which never includes the value) and its type; at most ``MAX_ERRORS`` of them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from . import schemas

log = logging.getLogger("alignsearch.service")
MAX_ERRORS = 10
MAX_MESSAGE = 200


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: ``detail`` is a message, or a list of ``{loc, msg, type}`` for a 422."""

    detail: str | list[dict[str, Any]]


def _known_names() -> frozenset[str]:
    names = {"body", "query", "path", "header", "form", "file"}
    for value in vars(schemas).values():
        if isinstance(value, type) and issubclass(value, BaseModel):
            names.update(value.model_fields)
    return frozenset(names)


KNOWN_NAMES = _known_names()
_SAFE_MESSAGE = re.compile(r"[^\x20-\x7e]")


def clean_errors(errors: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation errors without their input: known locations, bounded printable messages."""
    out = []
    for error in errors:
        if len(out) == MAX_ERRORS:
            break
        loc = [part if isinstance(part, int) or part in KNOWN_NAMES else "*" for part in error.get("loc", ())]
        msg = _SAFE_MESSAGE.sub("?", str(error.get("msg", "invalid")))[:MAX_MESSAGE]
        out.append({"loc": loc, "msg": msg, "type": str(error.get("type", "invalid"))[:64]})
    return out


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": clean_errors(exc.errors())}, status_code=422)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return JSONResponse({"detail": "internal error"}, status_code=500)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
