"""Connections that cannot be held open for nothing: a deadline for a request's headers.

uvicorn closes a kept-alive connection that stays idle ``timeout_keep_alive`` seconds after a response, but
has no deadline for the headers themselves: a client that connects and sends nothing, or sends a header byte
every few seconds, keeps its connection (and its place among the open files) as long as it likes.
:class:`HeaderDeadline` closes a connection whose request headers are not complete ``header_timeout_s``
after it opened or after its previous response; once a request's headers are in, the gate's body deadline
(``body_timeout_s``) and admission control's request deadline take over.

A request uvicorn cannot parse (a malformed request line or header, a bad ``Content-Length``, headers over
h11's size limit) is answered 400 with a JSON ``detail``, as every other refusal is, instead of uvicorn's plain
text; the message names no part of the request.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # the protocol uvicorn's "auto" picks
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:
    _Base = H11Protocol

KEEP_ALIVE_S = 5  # uvicorn's own default: an idle kept-alive connection is closed after this
INVALID_DETAIL = ("the request is not valid HTTP/1.1 (its request line, a header or Content-Length is malformed, "
                  "or its headers are too large)")


def _json_400() -> bytes:
    body = json.dumps({"detail": INVALID_DETAIL}).encode()
    return (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def guarded_protocol(header_timeout_s: float) -> type:
    """uvicorn's HTTP protocol with a header deadline of ``header_timeout_s`` seconds."""

    class HeaderDeadline(_Base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer: asyncio.TimerHandle | None = None
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            self._header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()  # no request's headers completed in time

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers get the same deadline

        def send_400_response(self, msg: str) -> None:
            if self.cycle is not None and not self.cycle.response_complete:  # a response under way: uvicorn's
                super().send_400_response(msg)
                return
            self.transport.write(_json_400())
            self.transport.close()

        def connection_lost(self, exc: Any) -> None:
            if getattr(self, "_header_timer", None) is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderDeadline
