"""Decode bombs for tests and the availability benchmark: small files that are expensive to decode.

:func:`scan_bomb` is a progressive JPEG of a flat colour whose last scan (a near-empty AC refinement of a few
dozen bytes) is repeated: every copy makes the decoder walk all the blocks of that component again, so a
6000 x 6000 one with 20,000 copies is under 2 MB and takes minutes to decode.
"""

from __future__ import annotations

import io
import re
import struct

from PIL import Image

_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan (SOS header and its entropy-coded data) in a JPEG written by Pillow."""
    pos, out = 2, []
    while pos + 4 <= len(data) and data[pos + 1] != 0xD9:
        length = struct.unpack(">H", data[pos + 2: pos + 4])[0]
        end = pos + 2 + length
        if data[pos + 1] == 0xDA:
            end = _MARKER.search(data, end).start()
            out.append((pos, end))
        pos = end
    return out


def scan_bomb(side: int = 2000, repeats: int = 1000, colour: tuple[int, int, int] = (120, 80, 40)) -> bytes:
    """A ``side`` x ``side`` progressive JPEG with its last scan repeated ``repeats`` more times."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, format="JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    start, end = _scans(data)[-1]
    return data[:end] + data[start:end] * repeats + data[end:]
