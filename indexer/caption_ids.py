"""The caption-id policy: which captions of a file are indexed, under which ids, linked to which image."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from alignsearch.models.captions import CaptionRow


def caption_items(rows: list[CaptionRow], known_images: set[str], taken: set[str] = frozenset(),
                  present: set[tuple[str | None, str]] = frozenset()) -> tuple[list[dict[str, Any]], list[dict]]:
    """Caption items and skips. Ids: ``IMAGE#k`` for the k-th caption of an indexed image, else ``caption-N``
    (N its line in the file). Ids in ``taken`` (already in the index) are stepped over; captions already in
    the index (``present``: (image, text) pairs) and empty ones are skipped with a reason. A caption naming an
    image that is not indexed stays standalone, the image kept in its ``extra``."""
    per_image: dict[str, int] = defaultdict(int)
    taken = set(taken)
    items, skipped = [], []
    for n, row in enumerate(rows):
        if not row.text:
            skipped.append({"item": f"caption {n + 1}", "reason": "empty caption"})
            continue
        if (row.image, row.text) in present:
            skipped.append({"item": f"caption {n + 1}", "reason": "already in the index"})
            continue
        if row.image is not None and row.image in known_images:
            while f"{row.image}#{per_image[row.image]}" in taken:
                per_image[row.image] += 1
            item_id = f"{row.image}#{per_image[row.image]}"
            items.append({"id": item_id, "text": row.text, "image_id": row.image, "extra": row.extra})
        else:
            number = n + 1
            while f"caption-{number}" in taken:
                number += len(rows)
            item_id = f"caption-{number}"
            items.append({"id": item_id, "text": row.text, "image_id": None,
                          "extra": {**row.extra, **({"image": row.image} if row.image else {})}})
        taken.add(item_id)
    return items, skipped
