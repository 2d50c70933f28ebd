"""The first thing every request meets (a plain ASGI middleware): the API key, then the body size.

Both run before any route reads the body: a request without the key is refused without reading a byte of
it; a declared ``Content-Length`` over the limit is refused at once, and a body streamed without one is
counted as it arrives and refused as soon as it passes the limit. Image searches may send up to
``Settings.max_upload_body`` bytes; everything else (JSON queries) ``Settings.max_json_bytes``. A body whose
next part does not arrive within ``Settings.body_timeout_s`` is answered 408 (a slow sender cannot hold a
request open for ever).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from .auth import is_open, key_matches
from .settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UPLOAD_PATHS = frozenset({"/search/image", "/search/similar", "/images"})


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit (answered as 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the {limit}-byte limit")


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case), or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


async def reply(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """Answer with ``{"detail": ...}`` and close the request."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           *((k.encode(), v.encode()) for k, v in (headers or {}).items())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """ASGI middleware: API key first, then the body-size limit (declared and streamed)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit(self, path: str) -> int:
        return self.settings.max_upload_body if path in UPLOAD_PATHS else self.settings.max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if not is_open(path) and not key_matches(self.settings.api_key, header(scope, b"authorization")):
            await reply(send, 401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                        {"www-authenticate": "Bearer"})
            return
        limit = self.limit(path)
        declared = header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await reply(send, 400, "malformed Content-Length header")
                return
            if int(declared) > limit:
                await reply(send, 413, f"request body of {int(declared)} bytes exceeds the {limit}-byte limit")
                return
        received, complete = 0, False

        async def limited() -> Message:
            nonlocal received, complete
            if complete:  # after the body, receive() only waits for a disconnect: no time limit
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.settings.body_timeout_s)
            except asyncio.TimeoutError:
                raise HTTPException(408, "the request body arrived too slowly") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                complete = not message.get("more_body", False)
            return message

        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except BodyTooLarge as exc:  # raised somewhere that did not turn it into a response
            if started:
                raise
            await reply(send, 413, exc.detail)
