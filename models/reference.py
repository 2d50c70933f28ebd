"""A model's reference bank: what its global scores mean, for any collection.

A raw global score (cosine of a query's and an item's global vectors) does not mean the same thing for every
query or collection: an everyday query scores its right photo of a scikit-image sample lower than a nonsense
string scores a random Flickr photo. The bank holds the global vectors of generic reference photos and
captions (``reference.safetensors`` in the model folder, float16, R x D each; measured on the model, not part
of it, so outside its fingerprint). A text query is scored against the reference photos, an image query
against the reference captions: those R scores are the query's own null distribution, what a score looks like
when nothing in particular matches. A hit is a match when its global score beats that distribution's
``quantile`` by ``margin`` (chosen by ``python -m alignsearch.bench.min_score MODEL --write``; both live in
``calibration.json`` beside the bank). ``relevance`` is the share of the reference items a hit beats, in
percent.

Cost per query: one R x D matrix-vector product (R = 1,000, D = 384: 0.4 MFLOP) and a sort of R numbers.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

REFERENCE_FILE = "reference.safetensors"
SIDES = ("images", "captions")  # reference photos (for text queries), reference captions (for image queries)


@dataclass(frozen=True)
class MatchRule:
    """``match`` when ``global_score >= quantile(reference scores, quantile) + margin``."""

    quantile: float
    margin: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.quantile <= 1.0 or not np.isfinite(self.margin):
            raise ValueError(f"a match rule needs 0 <= quantile <= 1 and a finite margin, not {self}")

    @classmethod
    def from_dict(cls, data: Any) -> "MatchRule | None":
        """The rule stored in ``calibration.json`` (``{"quantile": q, "margin": m}``), or None when malformed."""
        try:
            return cls(float(data["quantile"]), float(data.get("margin", 0.0)))
        except (TypeError, KeyError, ValueError):
            return None

    def threshold(self, reference: np.ndarray) -> np.ndarray:
        """The global-score threshold of each query from its reference scores (queries x R, or R): one number
        per query."""
        return np.quantile(np.asarray(reference, dtype=np.float64), self.quantile, axis=-1) + self.margin


@dataclass
class ReferenceBank:
    """Global vectors (L2-normalised, float32 in memory) of the reference photos and captions."""

    images: np.ndarray
    captions: np.ndarray

    def side(self, query_is_text: bool) -> np.ndarray:
        """What a query is compared with: the photos for a text query, the captions for an image query."""
        return self.images if query_is_text else self.captions

    def scores(self, queries: np.ndarray, query_is_text: bool) -> np.ndarray:
        """Queries x R global scores against the reference side, each row sorted ascending."""
        return np.sort(np.asarray(queries, dtype=np.float32) @ self.side(query_is_text).T, axis=1)


def relevance(score: float | np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Percent (0-100) of one query's reference scores (sorted ascending) strictly below ``score``."""
    return 100.0 * np.searchsorted(reference, score, side="left") / len(reference)


def load_reference(folder: str | os.PathLike) -> ReferenceBank | None:
    """The bank of a model folder; None when it has none or it is unreadable or malformed."""
    path = Path(folder) / REFERENCE_FILE
    if not path.is_file():
        return None
    try:
        arrays = load_file(str(path))
        images, captions = (np.asarray(arrays[s], dtype=np.float32) for s in SIDES)
    except Exception:  # noqa: BLE001 - unreadable, not safetensors (SafetensorError), or a side missing
        return None
    if images.ndim != 2 or captions.ndim != 2 or images.shape[1] != captions.shape[1] or not len(images) \
            or not len(captions):
        return None
    return ReferenceBank(images, captions)


def save_reference(folder: str | os.PathLike, images: np.ndarray, captions: np.ndarray,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write the bank into a model folder atomically (float16); returns its path."""
    folder = Path(folder)
    path = folder / REFERENCE_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{REFERENCE_FILE}.", dir=folder)
    os.close(fd)
    try:
        save_file({"images": np.ascontiguousarray(images, dtype=np.float16),
                   "captions": np.ascontiguousarray(captions, dtype=np.float16)}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users of an installed model
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
