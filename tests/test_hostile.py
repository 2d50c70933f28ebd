"""Hostile input against a real server on 127.0.0.1: every bad request gets a short 4xx that never copies
the input, the key is checked before the body is read, bodies and images are bounded before parsing and
decoding, and the expensive corners are refused cheaply."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from alignsearch.service.launch import serve

KEY = "hostile-key"
MAX_UPLOAD = 2_000_000
MARK = "QZXMARK"
HEADER_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(built):
    with serve(built, "--max-upload-bytes", str(MAX_UPLOAD),
               env={"ALIGNSEARCH_API_KEY": KEY, "ALIGNSEARCH_MAX_PIXELS": "1000000",
                    "ALIGNSEARCH_BODY_TIMEOUT_S": "1.5", "ALIGNSEARCH_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)},
               ready_timeout=600) as url:
        yield url


def post(server, path="/search/text", key=KEY, **kw) -> httpx.Response:
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **kw.pop("headers", {})}
    return httpx.post(server + path, headers=headers, timeout=30, **kw)


def raw(server, request: bytes, timeout: float = 10) -> bytes:
    """Send ``request`` as is on a socket and return the status line and headers of the answer."""
    parts = urlsplit(server)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data


def _image(fmt: str, size=(64, 48), **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt, **save)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_short_4xx(response: httpx.Response, status: int | tuple[int, ...]) -> None:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    assert len(response.content) < 2000 and MARK not in response.text and "BytesIO" not in response.text


# -- bodies that broke FastAPI's default error answer ----------------------------------------------------------

@pytest.mark.parametrize("path", ["/search/text", "/search/image"])
def test_a_body_that_is_not_utf8_is_a_4xx(server, path):
    response = post(server, path, content=b"\xff\x62\xfe", headers={"content-type": "application/json"})
    assert_short_4xx(response, (400, 422))


def test_a_lone_surrogate_in_the_query_is_422(server):
    response = post(server, content=b'{"query": "dog \\ud800"}', headers={"content-type": "application/json"})
    assert_short_4xx(response, 422)
    assert "unicode" in response.text.lower()


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("field", ["k", "candidates"])
def test_non_finite_numbers_are_422(server, field, literal):
    text = f'{{"query": "a dog", "{field}": {literal}}}'.encode()
    assert_short_4xx(post(server, content=text, headers={"content-type": "application/json"}), 422)
    image = f'{{"image_base64": "{_b64(_image("PNG"))}", "{field}": {literal}}}'.encode()
    assert_short_4xx(post(server, "/search/image", content=image, headers={"content-type": "application/json"}), 422)


def test_errors_never_copy_the_input(server):
    cases = [{"query": 5, f"{MARK}key": MARK}, {"query": MARK * 700}, {"query": [MARK]}, {f"{MARK}": {"a": [1]}},
             {"query": "dog", "k": MARK}]
    for body in cases:
        assert_short_4xx(post(server, json=body), 422)
    response = post(server, "/search/image", json={"image_base64": _b64(_image("PNG")), "explain": MARK})
    assert_short_4xx(response, 422)


# -- size: refused before parsing; the key before the body ----------------------------------------------------

def test_an_oversized_body_is_413_before_it_is_read(server):
    started = time.perf_counter()
    response = post(server, json={"query": MARK * 100_000})
    assert_short_4xx(response, 413)
    assert time.perf_counter() - started < 2

    def chunks():  # no Content-Length: counted as it streams
        yield b'{"query": "'
        for _ in range(200):
            yield MARK.encode() * 1000
        yield b'"}'
    response = post(server, content=chunks(), headers={"content-type": "application/json"})
    assert_short_4xx(response, 413)


def test_the_key_is_checked_before_the_body_is_read(server):
    # a declared 50 MB body that is never sent: the answer comes at once, from the headers alone
    head = ("POST /search/text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 50000000\r\n{auth}\r\n")
    assert raw(server, head.format(auth="").encode()).startswith(b"HTTP/1.1 401")
    assert raw(server, head.format(auth="Authorization: Bearer wrong\r\n").encode()).startswith(b"HTTP/1.1 401")
    assert raw(server, head.format(auth=f"Authorization: Bearer {KEY}\r\n").encode()).startswith(b"HTTP/1.1 413")


def test_a_body_that_stops_arriving_is_408(server):
    head = (f"POST /search/text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n{{\"query\": ")
    started = time.perf_counter()
    assert raw(server, head.encode()).startswith(b"HTTP/1.1 408")
    assert 1.0 < time.perf_counter() - started < 5


def test_a_json_object_with_a_million_keys_is_cheap_to_refuse(server):
    many = "{" + ",".join(f'"k{i}":1' for i in range(1_000_000)) + "}"  # 12 MB: over the limit
    assert_short_4xx(post(server, "/search/image", content=many, headers={"content-type": "application/json"}), 413)
    some = "{" + ",".join(f'"k{i}":1' for i in range(150_000)) + "}"  # 1.7 MB: under it
    started = time.perf_counter()
    response = post(server, "/search/image", content=some, headers={"content-type": "application/json"})
    assert_short_4xx(response, 400)
    assert time.perf_counter() - started < 1.5


# -- uploads --------------------------------------------------------------------------------------------------

def upload(server, data: bytes, **fields) -> httpx.Response:
    return post(server, "/search/image", files={"file": ("x", data, "application/octet-stream")},
                data={k: str(v) for k, v in fields.items()})


def test_a_non_image_upload_says_so_without_internals(server):
    response = upload(server, b"this is not an image at all")
    assert_short_4xx(response, 415)
    assert "JPEG, PNG, WebP, GIF or BMP" in response.json()["detail"]


@pytest.mark.parametrize("data", [
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n",
    b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n",
    "TIFF", "ICO", "PPM",
], ids=["eps", "pdf", "tiff", "ico", "ppm"])
def test_formats_outside_the_allow_list_are_415(server, data):
    response = upload(server, _image(data) if isinstance(data, str) else data)
    assert_short_4xx(response, 415)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_allowed_formats_are_searched(server, fmt):
    response = upload(server, _image(fmt), k=3)
    assert response.status_code == 200, response.text[:300]
    assert len(response.json()["results"]) == 3


def test_an_animated_gif_is_searched_by_its_first_frame(server):
    frames = [Image.new("RGB", (64, 48), colour) for colour in ("red", "green", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    first = upload(server, buf.getvalue(), k=5).json()
    alone = upload(server, _gif_frame(frames[0]), k=5).json()
    assert [r["id"] for r in first["results"]] == [r["id"] for r in alone["results"]]


def _gif_frame(frame: Image.Image) -> bytes:
    buf = io.BytesIO()
    frame.save(buf, format="GIF")
    return buf.getvalue()


def test_sides_and_pixels_are_checked_from_the_header(server):
    buf = io.BytesIO()
    Image.new("L", (1, 20_000)).save(buf, format="PNG")  # a few hundred bytes, 20,000 pixels tall
    started = time.perf_counter()
    response = upload(server, buf.getvalue())
    assert_short_4xx(response, 413)
    assert "side limit" in response.json()["detail"] and time.perf_counter() - started < 2
    assert "pixel limit" in upload(server, _image("PNG", (1500, 1000))).json()["detail"]


# -- admission limits ------------------------------------------------------------------------------------------

def test_work_and_query_length_limits_are_422(server):
    response = post(server, json={"query": "a dog", "k": 100, "candidates": 1000})
    assert_short_4xx(response, 422)
    assert "exceeds the limit" in response.json()["detail"]
    assert_short_4xx(post(server, json={"query": "dog " * 501}), 422)
    response = upload(server, _image("PNG"), k=100, candidates=1000)
    assert_short_4xx(response, 422)
    assert post(server, json={"query": "a dog", "k": 20, "candidates": 1000}).status_code == 200


# -- surface ---------------------------------------------------------------------------------------------------

def test_metrics_label_every_route_by_its_template(server):
    for path in ("/docs", "/openapi.json", "/static/app.js", "/readyz", "/images/no/such.jpg", "/no-such-path"):
        httpx.get(server + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    text = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    for template, status in (("/docs", 200), ("/openapi.json", 200), ("/static", 200), ("/readyz", 200),
                             ("/images/{image_id:path}", 404), ("unmatched", 404)):
        assert f'alignsearch_requests_total{{endpoint="{template}",status="{status}"}}' in text, template
    assert 'endpoint="unmatched",status="200"' not in text
    assert 'alignsearch_queue_waiting{lane="text-heavy"} 0.0' in text and "alignsearch_decodes_busy 0.0" in text


def test_readyz_details_need_the_key_and_never_show_a_path(server, built):
    assert set(httpx.get(server + "/readyz").json()) == {"status", "images", "captions"}
    ready = httpx.get(server + "/readyz", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert ready["index"] == built.name and "/" not in json.dumps(ready["index"])
    assert httpx.get(server + "/metrics").status_code == 401
    slash = httpx.get(server + "/metrics/", headers={"Authorization": f"Bearer {KEY}"})
    assert slash.status_code == 404 and "location" not in slash.headers


# -- connections and files -----------------------------------------------------------------------------------

# Without the header deadline the connections below stay open as long as the client trickles (uvicorn's
# keep-alive timer stops at the first byte received); with it they are closed HEADER_TIMEOUT_S after they opened or
# after their last response. The upper bounds allow a loaded machine plenty; the lower bound cannot be hit early.
SLACK_S = 20.0
TRICKLE = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 400  # 200 s at a byte every 0.5 s


def _closed_after(server, trickle: bytes = b"", every: float = 0.5, first: bytes = b"") -> float:
    """Seconds until the server closes a connection that sends ``first`` (a whole request, whose answer is read),
    then ``trickle`` one byte every ``every`` seconds (nothing when empty); counted from the connection's opening
    or from ``first``'s answer."""
    parts = urlsplit(server)
    limit = HEADER_TIMEOUT_S + SLACK_S
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as s:
        if first:
            s.sendall(first)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.perf_counter()
        s.settimeout(every)
        for byte in trickle:
            try:
                s.sendall(bytes([byte]))
                if s.recv(4096) == b"":
                    return time.perf_counter() - started
            except socket.timeout:
                pass
            except OSError:  # reset: closed
                return time.perf_counter() - started
            assert time.perf_counter() - started < limit, "the connection was never closed"
        s.settimeout(limit)
        try:
            while s.recv(4096):
                pass
        except socket.timeout:
            raise AssertionError("the connection was never closed") from None
    return time.perf_counter() - started


def test_a_connection_that_sends_nothing_is_closed(server):
    took = _closed_after(server)
    assert HEADER_TIMEOUT_S - 0.5 < took < HEADER_TIMEOUT_S + SLACK_S, took


def test_headers_sent_a_byte_at_a_time_are_cut_off(server):
    took = _closed_after(server, TRICKLE)
    assert HEADER_TIMEOUT_S - 0.5 < took < HEADER_TIMEOUT_S + SLACK_S, took


def test_a_kept_alive_connection_gets_a_new_header_deadline(server):
    took = _closed_after(server, TRICKLE, first=b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert HEADER_TIMEOUT_S - 0.5 < took < HEADER_TIMEOUT_S + SLACK_S, took


def _raw(server: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as it is; the status, headers and body of the answer (read to the connection's close)."""
    parts = urlsplit(server)
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize("request_bytes", [
    b"POST /search/text HTTP/1.1\r\nHost: x\r\nContent-Length: " + MARK.encode() + b"\r\n\r\n{}",
    b"POST /search/text HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\n{}",
    # 21 KB of headers, not yet ended: over h11's 16 KB for an incomplete request (sent all at once and ended, it
    # would be parsed whole); nothing more is sent, so the server has read all of it when it answers and closes
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + MARK.encode() * 3_000,
    b"GET /" + MARK.encode() + b" \x00 HTTP/1.1\r\n\r\n",
], ids=["bad-content-length", "two-content-lengths", "20-kb-header", "bad-request-line"])
def test_requests_uvicorn_cannot_parse_get_a_json_400(server, request_bytes):
    status, headers, body = _raw(server, request_bytes)
    assert status == 400 and headers["content-type"] == "application/json", (status, headers)
    detail = json.loads(body)["detail"]
    assert "not valid HTTP" in detail and MARK not in detail and len(body) < 300
    assert httpx.get(server + "/healthz").status_code == 200  # the server itself is fine


def test_a_photo_replaced_by_a_symlink_is_not_served(server, built):
    from alignsearch.indexer.index import Index

    index = Index(built, use_gpu=False)
    image_id, rel = index.conn.execute("SELECT id, path FROM images WHERE deleted = 0 LIMIT 1").fetchone()
    photo = index.images_root / rel
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{server}/images/{image_id}", headers=headers).content == photo.read_bytes()
    aside = photo.with_name(photo.name + ".aside")
    photo.rename(aside)
    try:
        for target in (built / "manifest.json", Path("/etc/passwd")):
            photo.symlink_to(target)
            response = httpx.get(f"{server}/images/{image_id}", headers=headers)
            photo.unlink()
            assert_short_4xx(response, 404)
    finally:
        aside.rename(photo)
