"""Precomputed region features as a model's image input: the bottom-up attention features (36 x 2048 per
photo) that TERAN, CHAN and TGDT read, for a model whose image backbone is ``precomputed:DIM``.

A features folder is read by image name, the name the captions file gives the photo. Two layouts, which may be
mixed in one folder:

- one file per photo: ``DIR/<name>.npy`` or ``DIR/<name less its extension>.npy`` (``sub/1000.jpg`` ->
  ``DIR/sub/1000.jpg.npy``, else ``DIR/sub/1000.npy``), an R x D float array; R may differ between photos
  (batches are padded and masked);
- one array per split: ``DIR/<split>.npy``, N x R x D, with ``DIR/<split>.ids.txt``, its N image names in row
  order, one a line (memory-mapped: only the rows a batch needs are read).

A ``boxes/`` subfolder (box coordinates some extractors write) is not read. Every array's D must be the
model's DIM: a mismatch is an error naming the file (:class:`FeaturesError`); a name without features, or with
an unreadable array, is skipped with the reason, as a photo that does not decode is.

Features enter where the backbone's features enter: :class:`PrecomputedFeatures` is a training feature source
(the ``batch`` interface of :class:`~models.features.CachedFeatures`); :func:`encode_arrays` runs the model on
read arrays, as the index build and image queries of ``eval`` do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import numpy as np
import torch

from .backbones import TokenFeatures
from .model import AlignModel, EncoderOutput

SUFFIX = ".npy"
IDS_SUFFIX = ".ids.txt"
IGNORED = ("boxes",)  # subfolders of DIR that are not features


class FeaturesError(ValueError):
    """Features that cannot go with the model or the folder is malformed (a one-line message naming the file)."""


@dataclass(frozen=True)
class FeatureRef:
    """Where one photo's regions are: a per-photo file (``row`` None) or a row of a per-split array."""

    path: Path
    row: int | None = None


def _strip_extension(name: str) -> str:
    path = PurePosixPath(name)
    return str(path.with_suffix("")) if path.suffix else name


def _open_header(path: Path) -> np.ndarray:
    """The array at ``path`` memory-mapped (its header read, no data)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


class FeatureFolder:
    """A folder of precomputed region features, looked up by image name (see the module's docstring)."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"features folder not found: {folder}")
        self.folder = folder
        self._root = folder.resolve()
        self._rows: dict[str, FeatureRef] = {}
        self._splits: dict[Path, np.ndarray] = {}
        for ids_file in sorted(folder.glob("*" + IDS_SUFFIX)):
            array_path = ids_file.with_name(ids_file.name[: -len(IDS_SUFFIX)] + SUFFIX)
            if not array_path.is_file():
                raise FeaturesError(f"{ids_file}: no {array_path.name} beside it (one array per split: "
                                    f"<split>.npy with <split>{IDS_SUFFIX})")
            names = [line.strip() for line in ids_file.read_text().splitlines()]
            if "" in names:
                raise FeaturesError(f"{ids_file}: line {names.index('') + 1} is empty (one image name a line)")
            try:
                array = _open_header(array_path)
            except (OSError, ValueError) as exc:
                raise FeaturesError(f"{array_path}: not a readable .npy array ({exc})") from exc
            if array.ndim != 3 or len(array) != len(names):
                raise FeaturesError(f"{array_path}: shape {tuple(array.shape)}, expected {len(names)} x R x D "
                                    f"(one row per line of {ids_file.name})")
            self._splits[array_path.resolve()] = array
            for row, name in enumerate(names):
                self._rows.setdefault(name, FeatureRef(array_path, row))

    def find(self, name: str) -> FeatureRef | None:
        """Where the regions of the photo ``name`` are: its full name first, then without its extension."""
        for key in dict.fromkeys((name, _strip_extension(name))):
            if key in self._rows:
                return self._rows[key]
            path = self.folder / (key + SUFFIX)
            resolved = path.resolve()
            if resolved not in self._splits and not self._ignored(resolved) and path.is_file():
                return FeatureRef(path)
        return None

    def _ignored(self, resolved: Path) -> bool:
        """Outside the folder (a link out of it), or in a subfolder that is not features."""
        return not resolved.is_relative_to(self._root) or resolved.relative_to(self._root).parts[0] in IGNORED

    def names(self) -> list[str]:
        """Every image name the folder has features for (a per-photo file's name less ``.npy``), sorted."""
        found = set(self._rows)
        for path in self.folder.rglob("*" + SUFFIX):
            resolved = path.resolve()
            if path.is_file() and resolved not in self._splits and not self._ignored(resolved):
                found.add(path.relative_to(self.folder).as_posix()[: -len(SUFFIX)])
        return sorted(found)

    def ids_for(self, captioned: Iterable[str]) -> list[str]:
        """The image ids of an index of this folder: the ``captioned`` names (so that captions link to their
        photo, whether or not the folder has their features), then the folder's names that none of them claims."""
        captioned = list(dict.fromkeys(captioned))
        claimed = {self.find(n) for n in captioned} - {None}
        return sorted(set(captioned) | {n for n in self.names() if self.find(n) not in claimed})

    def shape(self, ref: FeatureRef) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and dtype of one photo's regions, from the file's header."""
        if ref.row is not None:
            array = self._splits[ref.path.resolve()]
            return tuple(array.shape[1:]), array.dtype
        array = _open_header(ref.path)
        return tuple(array.shape), array.dtype

    def resolve(self, names: Sequence[str], dim: int) -> tuple[list[FeatureRef | None], list[tuple[str, str]]]:
        """Each name's regions (None where it has none, with the reason in the second list as (name, reason)).

        Headers only are read. An array whose width is not ``dim`` raises :class:`FeaturesError`."""
        refs: list[FeatureRef | None] = []
        failures: list[tuple[str, str]] = []
        for name in names:
            ref = self.find(name)
            reason = None
            if ref is None:
                stem = _strip_extension(name)
                looked = f"{name}{SUFFIX}" + (f" or {stem}{SUFFIX}" if stem != name else "")
                reason = f"no region features ({looked} in the features folder)"
            else:
                reason = self._problem(ref, dim)
            refs.append(None if reason else ref)
            if reason:
                failures.append((name, reason))
        return refs, failures

    def _problem(self, ref: FeatureRef, dim: int) -> str | None:
        try:
            shape, dtype = self.shape(ref)
        except (OSError, ValueError) as exc:
            return f"not a readable .npy array ({type(exc).__name__})"
        where = ref.path if ref.row is None else f"{ref.path} row {ref.row}"
        if len(shape) != 2 or dtype.kind != "f":
            return f"{where}: expected an R x D float array, got {dtype} of shape {shape}"
        if shape[1] != dim:
            raise FeaturesError(f"{where}: {shape[1]}-d region features, but the model's image backbone is "
                                f"precomputed:{dim}")
        if shape[0] == 0:
            return f"{where}: no regions"
        return None

    def read(self, ref: FeatureRef) -> np.ndarray:
        """One photo's regions, R x D float32."""
        if ref.row is not None:
            return np.asarray(self._splits[ref.path.resolve()][ref.row], dtype=np.float32)
        return np.asarray(np.load(ref.path, allow_pickle=False), dtype=np.float32)

    def first_dim(self) -> int:
        """D of the folder's first array (to make a ``precomputed:D`` config from the features themselves)."""
        for array in self._splits.values():
            return int(array.shape[-1])
        for name in self.names():
            ref = self.find(name)
            if ref is not None:
                try:
                    shape, _ = self.shape(ref)
                except (OSError, ValueError):
                    continue
                if len(shape) == 2:
                    return int(shape[1])
        raise FeaturesError(f"{self.folder}: no region features (.npy files, or <split>.npy with "
                            f"<split>{IDS_SUFFIX})")


def pad_regions(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """R_i x D arrays -> B x max R x D (zero padding) and the B x max R mask of real regions."""
    width = max(len(a) for a in arrays)
    features = np.zeros((len(arrays), width, arrays[0].shape[1]), np.float32)
    mask = np.zeros((len(arrays), width), bool)
    for i, a in enumerate(arrays):
        features[i, : len(a)] = a
        mask[i, : len(a)] = True
    return features, mask


def encode_arrays(model: AlignModel, arrays: Sequence[np.ndarray]) -> EncoderOutput:
    """Joint-space embeddings of photos given as region arrays (R_i x D)."""
    return model.encode_region_features(*pad_regions(arrays))


def check_input(model: AlignModel, features: Path | None) -> None:
    """A precomputed-features model needs ``--features``, and ``--features`` needs such a model."""
    kind = model.config.image_backbone
    if features is not None and model.takes_images:
        raise ValueError(f"--features needs a model whose image backbone is precomputed:DIM; this model's is "
                         f"{kind.kind}{':' + kind.name if kind.name else ''} (it reads photos: use --images)")
    if features is None and not model.takes_images:
        raise ValueError(f"this model reads precomputed region features (precomputed:{kind.feature_dim}), not "
                         f"photos: give --features DIR")


class PrecomputedFeatures:
    """Training's image feature source for a precomputed backbone: rows read from a :class:`FeatureFolder`
    batch by batch (nothing held in memory but the split arrays' maps), passed through the model's backbone.
    ``ok`` marks the items that have features; ``failures`` lists the others as (name, reason)."""

    def __init__(self, model: AlignModel, folder: FeatureFolder, names: Sequence[str]) -> None:
        self.backbone = model.image_backbone
        self.folder = folder
        self.refs, self.failures = folder.resolve(names, self.backbone.feature_dim)
        if not any(self.refs):
            first = self.failures[0][1] if self.failures else "no images"
            raise FeaturesError(f"{folder.folder}: none of the {len(names)} images has usable region features "
                                f"({first})")
        self.ok = torch.tensor([r is not None for r in self.refs])

    def batch(self, index: torch.Tensor, device: torch.device | str) -> TokenFeatures:
        empty = np.zeros((1, self.backbone.feature_dim), np.float32)
        arrays = [self.folder.read(ref) if ref is not None else empty for ref in map(self.refs.__getitem__,
                                                                                   index.tolist())]
        features, mask = pad_regions(arrays)
        return self.backbone(torch.from_numpy(features).to(device), torch.from_numpy(mask).to(device))
