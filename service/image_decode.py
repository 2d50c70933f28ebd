"""Decoding one uploaded image within limits: an allow-list of formats, sides and pixels from the header, a
JPEG's scans and decode work from its markers (:mod:`alignsearch.models.jpeg_work`), and a reduced-scale decode.

Only JPEG, PNG, WebP, GIF (first frame) and BMP are opened: Pillow never tries its other plugins, so an EPS
or PDF upload is refused before anything could start Ghostscript. Width, height and their product are
checked from the header, before a pixel is decoded, so a small file that would decode to a huge image (a
1 x 39,000,000 PNG) costs nothing. A decoded image is reduced to at most ``KEEP_SIDE`` pixels a side (a large
JPEG is decoded at a reduced scale to begin with, as the build decodes it).

This module imports Pillow and nothing of the server: it is what the decode processes
(:mod:`service.decode_procs`) load. Refusals are :class:`DecodeRefused` (an HTTP status and a message that
never quotes the upload).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from alignsearch.models.jpeg_work import MAX_BLOCK_SCANS, MAX_JPEG_SCANS, work_refusal

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
ALLOWED_NAMES = "JPEG, PNG, WebP, GIF or BMP"
KEEP_SIDE = 1024


class DecodeRefused(Exception):
    """An upload refused: ``status`` (413, 415) and a message for the client."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class ImageLimits:
    """What an upload may be (``max_pixels``, ``max_side``; for a JPEG ``max_scans`` and ``max_block_scans``,
    see :mod:`alignsearch.models.jpeg_work`) and how large a JPEG is decoded: at the smallest DCT scale that keeps both
    sides at ``decode_side`` or more."""

    max_pixels: int
    max_side: int
    decode_side: int = KEEP_SIDE
    max_scans: int = MAX_JPEG_SCANS
    max_block_scans: int = MAX_BLOCK_SCANS


def check_work(data: bytes, limits: ImageLimits) -> None:
    """Refuse (413) a JPEG with more scans or more decode work than ``limits`` allow; cheap (markers only)."""
    reason = work_refusal(data, limits.max_scans, limits.max_block_scans)
    if reason is not None:
        raise DecodeRefused(413, reason)


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Bytes of an allowed format -> RGB image (EXIF orientation applied); :class:`DecodeRefused` otherwise."""
    check_work(data, limits)
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise DecodeRefused(415, f"the upload is not a {ALLOWED_NAMES} image") from None
    except Image.DecompressionBombError:  # Pillow's own bound, far above ours
        raise DecodeRefused(413, f"the image exceeds the {limits.max_pixels} pixel limit") from None
    except Exception:  # noqa: BLE001  (Pillow's header parsers raise many kinds)
        raise DecodeRefused(415, f"the upload's {ALLOWED_NAMES} header is corrupt") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise DecodeRefused(415, "the image has no pixels")
    if max(width, height) > limits.max_side:
        raise DecodeRefused(413, f"image of {width}x{height} pixels exceeds the {limits.max_side}-pixel side limit")
    if width * height > limits.max_pixels:
        raise DecodeRefused(413, f"image of {width}x{height} pixels exceeds the {limits.max_pixels} pixel limit")
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
        raise DecodeRefused(415, f"the {image.format} image could not be decoded (truncated or corrupt)") from None
