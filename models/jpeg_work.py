"""What a JPEG costs to decode, read from its markers before a pixel is decoded.

A progressive JPEG is sent as scans, each refining the coefficients of some components; the decoder walks every
block of those components for every scan, so the work is the sum over the scans of the blocks they cover, and
the file's size says little about it: one near-empty AC scan repeated 20,000 times is 1.8 MB that takes
minutes to decode at 6000 x 6000 pixels, whatever scale it is decoded at (a reduced-scale decode still reads
every coefficient). :func:`jpeg_work` walks the segments (lengths skip the payloads; a regular expression finds
the end of each scan's entropy-coded data), counting scans and block-scans, and stops as soon as a limit is
passed: about a millisecond for a 10 MB file. Measured here: 21-23 ns per block-scan (2,000 and 6,000 px
sides), so 50M block-scans is about a second of one core.

One set of limits for every decode: the server's uploads (``service.image_decode``) and the build's photos
(:func:`alignsearch.models.preprocess.load_image_sized`) both refuse with :func:`work_refusal`'s message.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

# start-of-frame markers: every SOFn except DHT (C4), JPG (C8) and DAC (CC)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01, 0xD8}  # RSTn, TEM, SOI: no length
_SOS, _EOI = 0xDA, 0xD9
# the end of entropy-coded data: 0xFF followed by a marker (not a stuffed 0x00, a restart marker or fill)
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
MAX_JPEG_SCANS = 100  # Pillow writes 10 for a progressive JPEG; libjpeg-turbo's own tools suggest 500 at most
MAX_BLOCK_SCANS = 50_000_000  # about a second of one core; a 40-megapixel progressive JPEG needs 4-7M


@dataclass(frozen=True)
class JpegWork:
    """Scans seen and the blocks they cover (summed over scans and their components); ``stopped`` when the
    walk ended at a limit (the file has at least this much)."""

    scans: int
    block_scans: int
    stopped: bool = False


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _blocks(payload: bytes) -> dict[int, int]:
    """Blocks per component id from a start-of-frame payload."""
    if len(payload) < 6:
        return {}
    height, width, count = struct.unpack(">HHB", payload[1:6])
    parts = [payload[6 + 3 * i: 9 + 3 * i] for i in range(count) if len(payload) >= 9 + 3 * i]
    hmax = max((p[1] >> 4 for p in parts), default=1) or 1
    vmax = max((p[1] & 15 for p in parts), default=1) or 1
    out = {}
    for p in parts:
        h, v = (p[1] >> 4) or 1, (p[1] & 15) or 1
        out[p[0]] = _ceil(_ceil(width * h, hmax), 8) * _ceil(_ceil(height * v, vmax), 8)
    return out


def jpeg_work(data: bytes, max_scans: int, max_block_scans: int) -> JpegWork | None:
    """The work of decoding ``data``, or None when it is not a JPEG. The walk stops at the first scan past
    ``max_scans`` or ``max_block_scans``; a file it cannot follow (a bad length, truncated) is left to the
    decoder, which refuses it."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, scans, work, blocks = 2, 0, 0, {}
    end = len(data)
    while pos + 1 < end:
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker == _EOI or pos + 4 > end:
            break
        length = struct.unpack(">H", data[pos + 2: pos + 4])[0]
        payload = data[pos + 4: pos + 2 + length]
        pos += 2 + length
        if marker in _SOF:
            blocks = _blocks(payload)
        elif marker == _SOS:
            scans += 1
            count = payload[0] if payload else 0
            work += sum(blocks.get(payload[1 + 2 * i], 0) for i in range(count) if 1 + 2 * i < len(payload))
            if scans > max_scans or work > max_block_scans:
                return JpegWork(scans, work, stopped=True)
            found = _MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
    return JpegWork(scans, work)


def work_refusal(data: bytes, max_scans: int = MAX_JPEG_SCANS, max_block_scans: int = MAX_BLOCK_SCANS) -> str | None:
    """Why ``data`` (a JPEG over the scan or work limits) should not be decoded, or None (within them, or not a
    JPEG). The message never quotes the file."""
    work = jpeg_work(data, max_scans, max_block_scans)
    if work is None or not work.stopped:
        return None
    if work.scans > max_scans:
        return f"the JPEG has more than {max_scans} scans (progressive passes)"
    return f"the JPEG's scans would take more than {max_block_scans} block decodes"
