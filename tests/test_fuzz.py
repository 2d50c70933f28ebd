"""A bounded fuzz run against a real server on 127.0.0.1: random and half-valid requests to every route
(bodies, content types, methods, keys, uploads), zero 5xx allowed, each error a JSON ``detail``.

``ALIGNSEARCH_FUZZ_EXAMPLES`` sets the number of requests (default 300, about a minute on 2 CPU cores);
longer runs used 5,000.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from alignsearch.service.launch import serve

pytestmark = pytest.mark.slow  # a minute of requests on 2 cores: the hostile-input tests are the fast layer

KEY = "fuzz-key"
EXAMPLES = int(os.environ.get("ALIGNSEARCH_FUZZ_EXAMPLES", "300"))
FIELDS = ["query", "k", "candidates", "explain", "image_base64", "file", "min_score"]
PATHS = ["/search/text", "/search/image", "/images/", "/readyz", "/healthz", "/metrics", "/admin/reload", "/",
         "/static/app.js", "/openapi.json", "/docs", "/nope"]


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, format="PNG")
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` in its header and has no pixel data."""
    chunks = ((b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)), (b"IDAT", zlib.compress(b"")),
              (b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(data)) + kind + data
                                           + struct.pack(">I", zlib.crc32(kind + data)) for kind, data in chunks)


SMALL_PNG = _png(24, 16)
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=40) | st.sampled_from(["NaN", "1e400", "true", "10", "-1", "", "\x00"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=12)
numbers = st.integers(-5, 1200) | st.sampled_from([0, 1, 100, 101, 1000, 1001]) | scalars
half_valid = st.fixed_dictionaries(
    {}, optional={"query": st.text(max_size=300) | st.sampled_from(["a dog runs", " ", "a " * 1001]) | values,
                  "k": numbers, "candidates": numbers, "explain": st.booleans() | values,
                  "image_base64": st.sampled_from(["", "***", "aGVsbG8=", __import__("base64").b64encode(SMALL_PNG)
                                                   .decode()]) | values,
                  "min_score": scalars})
valid = st.fixed_dictionaries({"query": st.text(min_size=1, max_size=200), "k": st.integers(1, 100),
                               "candidates": st.integers(1, 1000), "explain": st.booleans()})
json_bodies = st.one_of(
    valid.map(lambda d: json.dumps({**d, "candidates": max(d["k"], min(d["candidates"], 20_000 // max(d["k"], 10)))})
              .encode()),
    half_valid.map(lambda d: json.dumps(d, allow_nan=True).encode()),
    values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.binary(max_size=200),
    half_valid.map(lambda d: json.dumps(d, allow_nan=True).encode()[: max(1, len(json.dumps(d)) // 2)]),
)
image_bytes = st.one_of(st.just(SMALL_PNG), st.just(SMALL_PNG[: len(SMALL_PNG) // 2]), st.binary(max_size=300),
                        st.builds(_png_header, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
                        st.sampled_from([b"GIF89a" + b"\x00" * 20, b"BM" + b"\xff" * 40, b"%!PS-Adobe-3.0 EPSF-3.0\n",
                                         b"\xff\xd8\xff\xe0" + b"\x00" * 30, b"RIFF\x00\x00\x00\x00WEBPVP8 "]))
form_fields = st.fixed_dictionaries({"k": st.integers(1, 20).map(str), "explain": st.sampled_from(["true", "false"])}
                                    ) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), st.text(max_size=20) | st.sampled_from(
    ["1", "10", "0", "1000", "NaN", "inf", "true", "yes", "maybe"]), max_size=5)


@st.composite
def requests(draw) -> dict:
    """Mostly searches with the right key (so the handlers are reached), the rest anything anywhere."""
    searching = draw(st.integers(0, 9)) < 7
    if searching:
        method, path = "POST", draw(st.sampled_from(["/search/text", "/search/image"]))
        key = draw(st.sampled_from([KEY] * 9 + [None]))
    else:
        method = draw(st.sampled_from(["GET", "GET", "POST", "PUT", "DELETE"]))
        path = draw(st.sampled_from(PATHS))
        key = draw(st.sampled_from([KEY, KEY, None, "wrong", KEY + " extra"]))
    if path == "/images/":
        path += quote(draw(st.text(max_size=30) | st.sampled_from(["../../etc/passwd", "%2e%2e/x", "a/b.jpg"])),
                      safe="/%")
    headers = {}
    if key:
        headers["authorization"] = draw(st.sampled_from(["Bearer "] * 5 + ["bearer ", "Basic "])) + key
    kind = draw(st.sampled_from(["json", "json", "multipart", "multipart", "raw", "none"]))
    request: dict = {"method": method, "url": path, "headers": headers}
    if kind == "json":
        request["content"] = draw(json_bodies)
        headers["content-type"] = draw(st.sampled_from(["application/json"] * 4 + [
            "application/json; charset=latin-1", "text/plain", "application/x-www-form-urlencoded"]))
    elif kind == "multipart":
        request["files"] = {draw(st.sampled_from(["file", "file", "image"])): ("x", draw(image_bytes))}
        request["data"] = draw(form_fields)
    elif kind == "raw":
        request["content"] = draw(st.binary(max_size=300))
        headers["content-type"] = draw(st.sampled_from(["multipart/form-data", "multipart/form-data; boundary=x",
                                                        "image/png", "application/json"]))
    return request


@pytest.fixture(scope="module")
def server(built):
    with serve(built, "--max-upload-bytes", "200000",
               env={"ALIGNSEARCH_API_KEY": KEY, "ALIGNSEARCH_MAX_PIXELS": "4000000"}) as url:
        yield url


def test_fuzz_no_5xx(server):
    seen: dict[int, int] = {}
    with httpx.Client(base_url=server, timeout=60) as client:

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(requests())
        def one(request):
            method = request["method"]
            if method == "GET" and (request.get("files") or request.get("content")):
                request = {**request, "method": "POST"}  # httpx sends no body with GET
            response = client.request(**request)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (request["url"], response.status_code, response.text[:300])
            if response.status_code >= 400:
                assert "detail" in response.json()

        one()
    print(f"fuzz: {sum(seen.values())} requests, status counts {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= EXAMPLES and not any(code >= 500 for code in seen)
