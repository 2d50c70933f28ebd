"""Image uploads: reading the request, and decoding it in a bounded pool of killable processes.

The limits and the decode itself are in :mod:`service.image_decode` (an allow-list of formats, sides and
pixels checked from the header, a JPEG's scans and work from its markers); the pool in
:mod:`service.decode_procs` (a decode past its time limit has its process killed, so its slot is free when its
503 is sent). This module maps their refusals onto HTTP answers.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from alignsearch.models.jpeg_work import work_refusal
from alignsearch.models.preprocess import DRAFT_FACTOR

from . import image_decode, schemas
from .admission import overloaded
from .decode_procs import DecodeBusy, DecodeTimeout, ProcessDecoder
from .image_decode import ALLOWED_FORMATS, ALLOWED_NAMES, KEEP_SIDE, DecodeRefused, ImageLimits

__all__ = ["ALLOWED_FORMATS", "ALLOWED_NAMES", "KEEP_SIDE", "Decoder", "ImageLimits", "decode_image",
           "decode_side_for", "read_upload"]
# A JSON image request has a handful of fields, a filter and a base64 string (which has no ':'); more colons
# than this means a body built to be expensive to parse (say, a million keys), refused before parsing.
MAX_JSON_COLONS = 512


def decode_side_for(model: object) -> int:
    """Twice the model's input size, as ``index build`` reads photos (``DRAFT_FACTOR``): a phone photo uploaded
    as a query gets the pixels its indexed copy got, and decodes in a third of the time a decode at
    ``KEEP_SIDE`` takes (16 against 44 ms for 12 megapixels); ``KEEP_SIDE`` for a model without a plain
    preprocessor."""
    pre = getattr(model, "image_preprocessor", None)
    return KEEP_SIDE if pre is None else min(KEEP_SIDE, DRAFT_FACTOR * pre.size)


def _http(exc: DecodeRefused) -> HTTPException:
    return HTTPException(exc.status, exc.detail)


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Bytes of an allowed format -> RGB image, in this process; HTTPException 413/415 otherwise."""
    try:
        return image_decode.decode_image(data, limits)
    except DecodeRefused as exc:
        raise _http(exc) from None


class Decoder:
    """Decodes uploads in ``workers`` killable processes, with ``queue`` more waiting and a time limit: 503 when
    full or late, 413/415 for an upload that is not a usable image. A JPEG over the scan or work limits is
    refused here, from its markers, before it takes a slot."""

    def __init__(self, limits: ImageLimits, workers: int = 2, queue: int = 8, timeout_s: float = 10.0,
                 prestart: bool = True, nice: int = 0) -> None:
        """``nice``: how much nicer than the server the decode processes run."""
        self.limits = limits
        self.timeout_s = timeout_s
        self.pool = ProcessDecoder(image_decode.decode_image, limits, workers, queue, timeout_s, prestart, nice)

    @property
    def busy(self) -> int:
        return self.pool.busy

    async def decode(self, data: bytes) -> Image.Image:
        try:
            image_decode.check_work(data, self.limits)
            return await self.pool.decode(data)
        except DecodeRefused as exc:
            raise _http(exc) from None
        except DecodeBusy:
            raise overloaded("too many images are being decoded; retry shortly") from None
        except DecodeTimeout:
            raise overloaded(f"decoding the image took longer than {self.timeout_s:g} s") from None

    def close(self) -> None:
        self.pool.close()


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
    reason = work_refusal(data)  # the limits index add decodes it under (models.preprocess)
    if reason is not None:
        raise HTTPException(413, reason)
    return data, image_format, [c.strip() for c in captions], fields
