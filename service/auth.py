"""The API key: one check, used by the gate before a request body is read and by the routes that only
show details (``/readyz``) to a caller who has the key."""

from __future__ import annotations

import secrets

from fastapi import Request

# Paths open without the key: the page, liveness/readiness (details need the key) and the API's own docs.
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
OPEN_PREFIXES = ("/static/",)


def is_open(path: str) -> bool:
    """True when ``path`` is served without the API key."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def key_matches(expected: str | None, authorization: str | bytes | None) -> bool:
    """True when no key is set, or ``authorization`` is ``Bearer <expected>`` (compared in constant time)."""
    if not expected:
        return True
    if isinstance(authorization, str):
        authorization = authorization.encode("latin-1", "replace")
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), expected.encode())


async def has_api_key(request: Request) -> bool:
    """Dependency: whether the caller sent the server's key (always True when the server has none)."""
    return key_matches(request.app.state.alignsearch.settings.api_key, request.headers.get("authorization"))
