"""Image uploads: reading the request, an allow-list of formats, limits from the header, and decoding in a
bounded pool of its own with a time limit.

Only JPEG, PNG, WebP, GIF (first frame) and BMP are opened: Pillow never tries its other plugins, so an EPS
or PDF upload is refused before anything could start Ghostscript. Width, height and their product are
checked from the header, before a pixel is decoded, so a small file that would decode to a huge image (a
1 x 39,000,000 PNG) costs nothing. Decodes run in their own thread pool (not the search workers'), at most
``workers`` at a time with ``queue`` more waiting; beyond that, or past the time limit, the answer is 503.
A decode that passes its time limit cannot be stopped inside Pillow: its thread finishes in the background
and keeps its pool slot until then, so the pool bound still holds. A decoded image is reduced to at most
``KEEP_SIDE`` pixels a side in the pool (the encoders read 224-384 px; a large JPEG is decoded at a reduced
scale to begin with, as the build decodes it), so an image waiting for its search batch holds a few MB, not a
hundred.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from alignsearch.models.preprocess import DRAFT_FACTOR

from . import schemas
from .admission import overloaded

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
ALLOWED_NAMES = "JPEG, PNG, WebP, GIF or BMP"
# A JSON image request has a handful of fields, a filter and a base64 string (which has no ':'); more colons
# than this means a body built to be expensive to parse (say, a million keys), refused before parsing.
MAX_JSON_COLONS = 512
KEEP_SIDE = 1024


@dataclass(frozen=True)
class ImageLimits:
    """What an upload may be (``max_pixels``, ``max_side``) and how large a JPEG is decoded: at the smallest DCT
    scale that keeps both sides at ``decode_side`` or more (:func:`decode_side_for` a model)."""

    max_pixels: int
    max_side: int
    decode_side: int = KEEP_SIDE


def decode_side_for(model: object) -> int:
    """Twice the model's input size, as ``index build`` reads photos (``DRAFT_FACTOR``): a phone photo uploaded
    as a query gets the pixels its indexed copy got, and decodes in a third of the time a decode at
    ``KEEP_SIDE`` takes (16 against 44 ms for 12 megapixels); ``KEEP_SIDE`` for a model without a plain
    preprocessor."""
    pre = getattr(model, "image_preprocessor", None)
    return KEEP_SIDE if pre is None else min(KEEP_SIDE, DRAFT_FACTOR * pre.size)


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Bytes of an allowed format -> RGB image (EXIF orientation applied); HTTPException 413/415 otherwise."""
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise HTTPException(415, f"the upload is not a {ALLOWED_NAMES} image") from None
    except Image.DecompressionBombError:  # Pillow's own bound, far above ours
        raise HTTPException(413, f"the image exceeds the {limits.max_pixels} pixel limit") from None
    except Exception:  # noqa: BLE001  (Pillow's header parsers raise many kinds)
        raise HTTPException(415, f"the upload's {ALLOWED_NAMES} header is corrupt") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise HTTPException(415, "the image has no pixels")
    if max(width, height) > limits.max_side:
        raise HTTPException(413, f"image of {width}x{height} pixels exceeds the {limits.max_side}-pixel side limit")
    if width * height > limits.max_pixels:
        raise HTTPException(413, f"image of {width}x{height} pixels exceeds the {limits.max_pixels} pixel limit")
    try:
        if image.format == "JPEG":
            image.draft("RGB", (limits.decode_side, limits.decode_side))  # DCT scaling: never below decode_side
        image.load()  # the first frame of an animation
        ImageOps.exif_transpose(image, in_place=True)  # no copy of the full-size pixels
        if image.mode not in ("RGB", "RGBA", "L", "LA"):  # palette, CMYK, 1-bit: resized in RGB, not nearest
            image = image.convert("RGB")
        image.thumbnail((KEEP_SIDE, KEEP_SIDE))  # in place; a no-op for images that are already small
        return image.convert("RGB")
    except Exception:  # noqa: BLE001  (truncated or corrupt data fails in many ways inside the decoders)
        raise HTTPException(415, f"the {image.format} image could not be decoded (truncated or corrupt)") from None


class Decoder:
    """Decodes uploads in a thread pool of ``workers`` threads, with ``queue`` more waiting and a time limit."""

    def __init__(self, limits: ImageLimits, workers: int = 2, queue: int = 8, timeout_s: float = 10.0) -> None:
        if workers < 1:
            raise ValueError("decode workers must be >= 1")
        self.limits = limits
        self.workers = workers
        self.capacity = workers + max(0, queue)
        self.timeout_s = timeout_s
        self.busy = 0  # submitted and not finished (a timed-out decode counts until its thread is done)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="alignsearch-decode")

    async def decode(self, data: bytes) -> Image.Image:
        if self.busy >= self.capacity:
            raise overloaded("too many images are being decoded; retry shortly")
        loop = asyncio.get_running_loop()
        self.busy += 1
        future = loop.run_in_executor(self._pool, decode_image, data, self.limits)
        future.add_done_callback(self._done)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.TimeoutError:
            raise overloaded(f"decoding the image took longer than {self.timeout_s:g} s") from None

    def _done(self, future: asyncio.Future) -> None:
        self.busy -= 1
        if not future.cancelled():
            future.exception()  # retrieved, so a refusal after a timeout is not logged as never retrieved

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _validation(exc: ValidationError) -> RequestValidationError:
    return RequestValidationError(exc.errors(include_url=False, include_context=False, include_input=False))


async def _multipart(request: Request, limit: int, model: type) -> tuple[bytes, Any]:
    """The file and the other fields (validated as ``model``) of a multipart request."""
    form = await request.form(max_files=1, max_fields=8)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise RequestValidationError([{"type": "missing", "loc": ("body", "file"),
                                       "msg": "multipart field 'file' (the image) is required"}])
    data = await upload.read(limit + 1)
    try:
        return data, model.model_validate({k: v for k, v in form.items() if k != "file"})
    except ValidationError as exc:
        raise _validation(exc) from None


async def _json_body(request: Request, model: type) -> Any:
    body = await request.body()
    if body.count(b":") > MAX_JSON_COLONS:
        raise HTTPException(400, "the JSON body has far more fields than an image search takes")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _validation(exc) from None


def _base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(400, "image_base64 is not valid base64") from None


def _checked(data: bytes, limit: int) -> bytes:
    if len(data) > limit:
        raise HTTPException(413, f"image exceeds the {limit}-byte upload limit")
    if not data:
        raise HTTPException(400, "the uploaded file is empty")
    return data


async def read_upload(request: Request, limit: int) -> tuple[bytes, schemas.ImageSearchFields]:
    """The image bytes and the search fields of a multipart or JSON request (the gate already bounded the
    body's size)."""
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        data, fields = await _multipart(request, limit, schemas.ImageSearchFields)
    elif ctype.startswith("application/json"):
        parsed = await _json_body(request, schemas.ImageSearchJSON)
        data = _base64(parsed.image_base64)
        fields = schemas.ImageSearchFields.model_validate(parsed.model_dump(exclude={"image_base64"}))
    else:
        raise HTTPException(415, "send multipart/form-data with a 'file' field, or JSON with 'image_base64'")
    return _checked(data, limit), fields


async def read_similar(request: Request, limit: int) -> tuple[str | None, bytes | None, schemas.SimilarFields]:
    """A "more like this" request: (an indexed photo's id, None) from JSON ``id``, or (None, the image bytes)
    from multipart ``file`` or JSON ``image_base64``; and the search fields."""
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        data, fields = await _multipart(request, limit, schemas.SimilarFields)
        return None, _checked(data, limit), fields
    if ctype.startswith("application/json"):
        parsed = await _json_body(request, schemas.SimilarJSON)
        fields = schemas.SimilarFields.model_validate(parsed.model_dump(exclude={"id", "image_base64"}))
        if parsed.id is not None:
            return parsed.id, None, fields
        return None, _checked(_base64(parsed.image_base64), limit), fields
    raise HTTPException(415, "send JSON with 'id' (an indexed photo) or 'image_base64', or multipart with 'file'")


MAX_UPLOAD_CAPTIONS = 20
MAX_CAPTION_CHARS = 2000


def _json_form_field(form: Any, name: str, kind: type, default: Any) -> Any:
    value = form.get(name)
    if value is None or value == "":
        return default
    try:
        parsed = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        parsed = [value] if kind is list and isinstance(value, str) else None  # one caption as plain text
    if kind is list and isinstance(parsed, str):
        parsed = [parsed]
    if not isinstance(parsed, kind):
        raise RequestValidationError([{"type": "value_error", "loc": ("body", name),
                                       "msg": f"{name} must be a JSON {'list' if kind is list else 'object'}"}])
    return parsed


async def upload_fields(request: Request, limit: int) -> tuple[bytes, str, list[str], dict[str, list[Any]]]:
    """A photo to add: multipart ``file``, ``captions`` (a JSON list of strings, or one caption as text) and
    ``metadata`` (a JSON object of fields); returns (bytes, image format, captions, field -> values)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise HTTPException(415, "send multipart/form-data with a 'file' field (and 'captions', 'metadata')")
    form = await request.form(max_files=1, max_fields=8)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise RequestValidationError([{"type": "missing", "loc": ("body", "file"),
                                       "msg": "multipart field 'file' (the photo) is required"}])
    data = _checked(await upload.read(limit + 1), limit)
    captions = _json_form_field(form, "captions", list, [])
    if len(captions) > MAX_UPLOAD_CAPTIONS or not all(isinstance(c, str) and 0 < len(c.strip()) <= MAX_CAPTION_CHARS
                                                      for c in captions):
        raise RequestValidationError([{"type": "value_error", "loc": ("body", "captions"),
                                       "msg": f"captions: at most {MAX_UPLOAD_CAPTIONS} non-empty strings of at most "
                                              f"{MAX_CAPTION_CHARS} characters"}])
    metadata = _json_form_field(form, "metadata", dict, {})
    fields = {str(k): (v if isinstance(v, list) else [] if v is None else [v]) for k, v in metadata.items()}
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            image_format = image.format
    except Exception:  # noqa: BLE001  (Pillow's header parsers raise many kinds)
        raise HTTPException(415, f"the upload is not a {ALLOWED_NAMES} image") from None
    return data, image_format, [c.strip() for c in captions], fields
