"""A Python client for the alignsearch HTTP API (sync and async, on httpx)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote
from typing import Any

import httpx


class AlignSearchError(RuntimeError):
    """A 4xx/5xx answer; ``status``, the server's ``detail``, and ``retry_after`` (seconds) on a 503 that
    says when to come back (the server is busy)."""

    def __init__(self, status: int, detail: Any, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _page(offset: int, filter: dict | None) -> dict[str, Any]:
    return {**({"offset": offset} if offset else {}), **({"filter": filter} if filter is not None else {})}


def _text_body(query: str, k: int, candidates: int, explain: bool, min_score: float | None = None,
               offset: int = 0, filter: dict | None = None) -> dict[str, Any]:
    body = {"query": query, "k": k, "candidates": candidates, "explain": explain, **_page(offset, filter)}
    return body if min_score is None else {**body, "min_score": min_score}


def _form(fields: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v) if isinstance(v, (dict, bool)) else str(v) for k, v in fields.items()}


def _image_files(image: bytes | str | Path, k: int, candidates: int, explain: bool, offset: int = 0,
                 filter: dict | None = None) -> dict[str, Any]:
    data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
    return {"files": {"file": ("image", data, "application/octet-stream")},
            "data": _form({"k": k, "candidates": candidates, "explain": explain, **_page(offset, filter)})}


def _similar(image_id: str | None, image: bytes | str | Path | None, k: int, offset: int, filter: dict | None
             ) -> dict[str, Any]:
    """The request of a "more like this" search: JSON with the indexed photo's id, or the photo uploaded."""
    if (image_id is None) == (image is None):
        raise ValueError("give exactly one of image_id and image")
    if image_id is not None:
        return {"json": {"id": image_id, "k": k, **_page(offset, filter)}}
    data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
    return {"files": {"file": ("image", data, "application/octet-stream")},
            "data": _form({"k": k, **_page(offset, filter)})}


def _upload(image: bytes | str | Path, captions: list[str] | None, metadata: dict | None) -> dict[str, Any]:
    data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
    fields = {**({"captions": json.dumps(captions)} if captions else {}),
              **({"metadata": json.dumps(metadata)} if metadata else {})}
    return {"files": {"file": ("image", data, "application/octet-stream")}, "data": fields}


def _image_path(image_id: str) -> str:
    return "/images/" + "/".join(quote(part, safe="") for part in image_id.split("/"))


def _raise_for_status(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        retry = response.headers.get("retry-after", "")
        raise AlignSearchError(response.status_code, detail, float(retry) if retry.isdigit() else None)
    return response


def _json(response: httpx.Response) -> Any:
    return _raise_for_status(response).json()


class AlignSearchClient:
    """Synchronous client: ``AlignSearchClient("http://127.0.0.1:8000").search_text("a dog on a beach")``."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout)

    def __enter__(self) -> AlignSearchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def search_text(self, query: str, k: int = 10, candidates: int = 100, explain: bool = False,
                    min_score: float | None = None, offset: int = 0, filter: dict | None = None) -> dict:
        """Ranked photos; ``offset`` skips ranks (the answer's ``next_offset`` gives the next page's),
        ``filter`` keeps photos whose fields match (see docs/filters.md)."""
        return _json(self.http.post("/search/text", json=_text_body(query, k, candidates, explain, min_score,
                                                                    offset, filter)))

    def search_image(self, image: bytes | str | Path, k: int = 10, candidates: int = 100,
                     explain: bool = False, offset: int = 0, filter: dict | None = None) -> dict:
        return _json(self.http.post("/search/image", **_image_files(image, k, candidates, explain, offset, filter)))

    def search_similar(self, image_id: str | None = None, image: bytes | str | Path | None = None, k: int = 10,
                       offset: int = 0, filter: dict | None = None) -> dict:
        """Photos like an indexed one (``image_id``) or an uploaded one (``image``: bytes or a file path)."""
        return _json(self.http.post("/search/similar", **_similar(image_id, image, k, offset, filter)))

    def add_image(self, image: bytes | str | Path, captions: list[str] | None = None,
                  metadata: dict | None = None) -> dict:
        """Index a photo (``POST /images``; needs the API key or a server with --allow-writes): its id,
        ``created`` and fields; searchable once this returns."""
        return _json(self.http.post("/images", **_upload(image, captions, metadata)))

    def set_metadata(self, image_id: str, fields: dict) -> dict:
        """Replace the named fields of an indexed photo (None removes one)."""
        return _json(self.http.patch(_image_path(image_id) + "/metadata", json=fields))

    def delete_image(self, image_id: str) -> dict:
        return _json(self.http.delete(_image_path(image_id)))

    def image(self, image_id_or_uri: str) -> bytes:
        path = image_id_or_uri if image_id_or_uri.startswith("/images/") else f"/images/{image_id_or_uri}"
        return _raise_for_status(self.http.get(path)).content

    def ready(self) -> dict:
        return _json(self.http.get("/readyz"))

    def reload(self) -> dict:
        """Ask the server to swap to its index folder's newest version now (``POST /admin/reload``)."""
        return _json(self.http.post("/admin/reload"))

    def metrics(self) -> str:
        return _raise_for_status(self.http.get("/metrics")).text


class AsyncAlignSearchClient:
    """Asynchronous client with the same methods as :class:`AlignSearchClient`."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout)

    async def __aenter__(self) -> AsyncAlignSearchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def search_text(self, query: str, k: int = 10, candidates: int = 100, explain: bool = False,
                          min_score: float | None = None, offset: int = 0, filter: dict | None = None) -> dict:
        return _json(await self.http.post("/search/text", json=_text_body(query, k, candidates, explain, min_score,
                                                                          offset, filter)))

    async def search_image(self, image: bytes | str | Path, k: int = 10, candidates: int = 100,
                           explain: bool = False, offset: int = 0, filter: dict | None = None) -> dict:
        return _json(await self.http.post("/search/image",
                                          **_image_files(image, k, candidates, explain, offset, filter)))

    async def search_similar(self, image_id: str | None = None, image: bytes | str | Path | None = None,
                             k: int = 10, offset: int = 0, filter: dict | None = None) -> dict:
        return _json(await self.http.post("/search/similar", **_similar(image_id, image, k, offset, filter)))

    async def add_image(self, image: bytes | str | Path, captions: list[str] | None = None,
                        metadata: dict | None = None) -> dict:
        return _json(await self.http.post("/images", **_upload(image, captions, metadata)))

    async def set_metadata(self, image_id: str, fields: dict) -> dict:
        return _json(await self.http.patch(_image_path(image_id) + "/metadata", json=fields))

    async def delete_image(self, image_id: str) -> dict:
        return _json(await self.http.delete(_image_path(image_id)))

    async def ready(self) -> dict:
        return _json(await self.http.get("/readyz"))

    async def metrics(self) -> str:
        return _raise_for_status(await self.http.get("/metrics")).text
