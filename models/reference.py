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

from .scoring import inner_products

REFERENCE_FILE = "reference.safetensors"
SIDES = ("images", "captions")  # reference photos (for text queries), reference captions (for image queries)


COLLECTION_M = 10  # the collection evidence: a hit is compared with the M-th best global score of its query
MAX_COLLECTION_M = 1000  # what a calibration file may ask the first stage to fetch for it


@dataclass(frozen=True)
class MatchRule:
    """``match`` when a hit's global score clears its query's threshold, made of one or more tests (a hit
    matches when it clears any of them: the lowest threshold applies):

    - ``quantile`` (+ ``margin``): the ``quantile`` of the query's reference scores plus ``margin``;
    - ``z``: the mean of the query's reference scores plus ``z`` standard deviations;
    - ``gap``: the query's ``collection_m``-th best global score in the collection searched plus ``gap``
      (how far the hit stands out from the rest of this collection; no such test with one item);
    - ``linear`` (a, b, c): ``a * z_hit + b * gap_hit >= c``, with ``z_hit`` the hit's score in reference
      standard deviations above the reference mean and ``gap_hit`` its score minus the ``collection_m``-th best
      (without a collection score, ``a * z_hit >= c``).

    Each is a threshold on the hit's global score, so ``match`` stays ``global_score >= threshold``. A rule
    written as ``{"quantile": q, "margin": m}`` (the only kind before collection tests) means what it meant."""

    quantile: float | None = None
    margin: float = 0.0
    z: float | None = None
    gap: float | None = None
    linear: tuple[float, float, float] | None = None
    collection_m: int = COLLECTION_M

    def __post_init__(self) -> None:
        finite = all(np.isfinite(x) for x in (self.margin, self.z or 0.0, self.gap or 0.0, *(self.linear or ())))
        ok = finite and 1 <= self.collection_m <= MAX_COLLECTION_M and (self.quantile is None or 0.0 <= self.quantile <= 1.0)
        if self.linear is not None:
            a, b, _ = self.linear
            ok = ok and len(self.linear) == 3 and a >= 0.0 and b >= 0.0 and a + b > 0.0
        if not ok or (self.quantile, self.z, self.gap, self.linear) == (None, None, None, None):
            raise ValueError(f"a match rule needs at least one test and valid parameters, not {self}")

    @property
    def uses_collection(self) -> bool:
        """Whether the rule needs the query's ``collection_m``-th best global score in the collection."""
        return self.gap is not None or (self.linear is not None and self.linear[1] > 0.0)

    @classmethod
    def from_dict(cls, data: Any) -> "MatchRule | None":
        """The rule stored in ``calibration.json`` (``{"quantile": q, "margin": m}``, and since collection tests
        any of ``"z"``, ``"gap"``, ``"linear": [a, b, c]``, ``"collection_m"``), or None when malformed."""
        try:
            def number(key: str) -> float | None:
                value = data.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise TypeError(key)
                return None if value is None else float(value)

            linear = data.get("linear")
            if linear is not None:
                linear = tuple(float(x) for x in linear)
            m = data.get("collection_m", COLLECTION_M)
            if isinstance(m, bool) or not isinstance(m, int):
                raise TypeError("collection_m")
            return cls(number("quantile"), number("margin") or 0.0, number("z"), number("gap"), linear, m)
        except (TypeError, KeyError, ValueError, AttributeError):
            return None

    def to_dict(self) -> dict[str, Any]:
        """What :meth:`from_dict` reads back (unused tests left out)."""
        out: dict[str, Any] = {}
        if self.quantile is not None:
            out.update(quantile=self.quantile, margin=self.margin)
        if self.z is not None:
            out["z"] = self.z
        if self.gap is not None:
            out["gap"] = self.gap
        if self.linear is not None:
            out["linear"] = list(self.linear)
        if self.uses_collection:
            out["collection_m"] = self.collection_m
        return out

    def threshold(self, reference: np.ndarray, collection: float | np.ndarray | None = None) -> np.ndarray:
        """The global-score threshold of each query from its reference scores (queries x R, or R) and its
        ``collection_m``-th best score in the collection (one per query; NaN or None: not known): one number
        per query, ``inf`` when no test applies (a collection test alone, without a collection score)."""
        ref = np.asarray(reference, dtype=np.float64)
        shape = ref.shape[:-1]
        coll = np.broadcast_to(np.asarray(np.nan if collection is None else collection, dtype=np.float64), shape)
        known = np.isfinite(coll)
        parts = []
        if self.quantile is not None:
            parts.append(np.quantile(ref, self.quantile, axis=-1) + self.margin)
        mean, sd = ref.mean(axis=-1), np.maximum(ref.std(axis=-1), 1e-6)
        if self.z is not None:
            parts.append(mean + self.z * sd)
        if self.gap is not None:
            parts.append(np.where(known, np.where(known, coll, 0.0) + self.gap, np.inf))
        if self.linear is not None:
            a, b, c = self.linear
            with np.errstate(divide="ignore", invalid="ignore"):
                with_coll = (c + a * mean / sd + b * np.where(known, coll, 0.0)) / (a / sd + b)
                alone = mean + c * sd / a if a > 0 else np.full(shape, np.inf)
            parts.append(np.where(known, with_coll, alone))
        return np.min(np.stack(np.broadcast_arrays(*parts)), axis=0)


def collection_score(scores: np.ndarray, m: int = COLLECTION_M) -> float:
    """The ``m``-th best of one query's global scores in a collection (given at least its ``m`` best, in any
    order); the lowest when fewer are given (a collection of fewer items); NaN with fewer than two."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if len(scores) < 2:
        return float("nan")
    return float(np.sort(scores)[::-1][min(m, len(scores)) - 1])


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
        return np.sort(inner_products(queries, self.side(query_is_text)), axis=1)


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
