"""Frozen-backbone features for training, computed once and cached on disk (safetensors)."""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .backbones import TokenFeatures
from .model import AlignModel, _pad_tokens
from .mosaic import Mosaic, make_mosaics
from .preprocess import ImageDecodeError, augmented_view, load_image


FEATURE_FILES = ("tokens", "mask", "pooled", "ok")


@dataclass
class CachedFeatures:
    """Backbone features for a list of items, stored in float16; ``ok`` marks the items that decoded.

    The arrays may be memory maps of a cache folder (:meth:`open`): a batch reads only its rows from disk."""

    tokens: torch.Tensor | np.ndarray
    mask: torch.Tensor | np.ndarray
    pooled: torch.Tensor | np.ndarray
    ok: torch.Tensor

    def __len__(self) -> int:
        return len(self.ok)

    def batch(self, index: torch.Tensor, device: torch.device | str) -> TokenFeatures:
        """Rows ``index`` in float32 on ``device``, the token axis cut to the longest row in the batch."""
        rows = index.numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        mask = _rows(self.mask, rows)
        width = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
        return TokenFeatures(
            _rows(self.tokens, rows)[:, :width].to(device, torch.float32),
            mask[:, :width].to(device),
            _rows(self.pooled, rows).to(device, torch.float32),
        )

    def save(self, folder: Path, stamp: str = "") -> None:
        """Write the arrays as ``.npy`` files of a new cache folder, atomically (a temporary folder renamed)."""
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in FEATURE_FILES:
            value = getattr(self, name)
            np.save(tmp / f"{name}.npy", value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value))
        (tmp / "stamp.json").write_text(json.dumps({"stamp": stamp, "rows": len(self)}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)

    @classmethod
    def open(cls, folder: Path, stamp: str = "") -> "CachedFeatures | None":
        """The features of a complete cache folder, memory-mapped; None when it is missing, incomplete or was
        written by another version of the preprocessing (``stamp``)."""
        try:
            meta = json.loads((folder / "stamp.json").read_text())
            if meta.get("stamp") != stamp:
                return None
            arrays = {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in FEATURE_FILES}
        except (OSError, ValueError):
            return None
        if any(len(a) != meta["rows"] for a in arrays.values()):
            return None
        return cls(arrays["tokens"], arrays["mask"], arrays["pooled"], torch.from_numpy(np.array(arrays["ok"])))


def _rows(array: torch.Tensor | np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """``array[rows]`` as a torch tensor; a memory map is read in sorted row order (sequential pages)."""
    if isinstance(array, torch.Tensor):
        return array[torch.from_numpy(rows)]
    order = np.argsort(rows, kind="stable")
    picked = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    picked[order] = array[rows[order]]
    return torch.from_numpy(picked)


def preprocessing_stamp(model: AlignModel) -> str:
    """What a cached image feature depends on besides the backbone's config: the preprocessing's code and
    settings (resize, normalisation, augmented views, the decode). A cache with another stamp is rebuilt."""
    from . import preprocess

    pre = model.image_preprocessor
    parts = [inspect.getsource(f) for f in (preprocess.ImagePreprocessor, preprocess.augmented_view,
                                             preprocess.load_image_sized, _view_of)]
    if pre is not None:
        parts.append(json.dumps([pre.size, pre.mean.tolist(), pre.std.tolist()]))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _cache_key(kind: str, backbone: dict, items: Sequence[str]) -> str:
    digest = hashlib.sha256(json.dumps([kind, backbone], sort_keys=True).encode())
    for item in items:
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()[:20]


def _concat(parts: list[TokenFeatures]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(p.tokens.shape[1] for p in parts)
    tokens = torch.cat([_pad_tokens(p.tokens.half().cpu(), width) for p in parts])
    mask = torch.cat([_pad_tokens(p.mask.cpu(), width) for p in parts])
    pooled = torch.cat([p.pooled.half().cpu() for p in parts])
    return tokens, mask, pooled


def _view_of(image: Image.Image, path: Path, view: int) -> Image.Image:
    """``image`` itself for view 0, else its seeded augmented view number ``view`` (the same on every run)."""
    return augmented_view(image, zlib.crc32(f"{path.name}:{view}".encode())) if view else image


def image_features(
    model: AlignModel, paths: Sequence[Path], cache_dir: Path | None, batch_size: int = 32, workers: int = 4,
    view: int = 0,
) -> tuple[CachedFeatures, list[tuple[str, str]]]:
    """Backbone region features of ``paths``; images that fail to decode are zero rows with ``ok`` False,
    and are returned as (path, reason) pairs. ``view`` > 0 gives a seeded augmented view of every image.

    With ``cache_dir`` the features are written as they are computed into memory-mapped float16 arrays there
    (a folder per backbone, preprocessing, view and image list): an interrupted run continues where its last
    flushed batch ended, a finished one is reused as it is, and a change of backbone or preprocessing code
    starts a new folder."""
    if getattr(model, "companion", None) is not None:
        raise ValueError("a combined model has two image towers: encode its photos with encode_images, not "
                         "through one backbone's cached features")
    stamp = [f"{p}:{p.stat().st_size}" if p.exists() else str(p) for p in paths]
    key = _cache_key(f"image-view{view}" if view else "image", model.config.image_backbone.__dict__, stamp)
    folder = cache_dir / f"image-{key}" if cache_dir else None
    version = preprocessing_stamp(model)
    if folder is not None:
        feats = CachedFeatures.open(folder, version)
        if feats is not None:
            return feats, _failed(paths, feats)

    def read(path: Path):
        try:
            return _view_of(load_image(path), path, view)
        except (ImageDecodeError, OSError) as exc:
            return exc

    writer = _FeatureWriter(folder, version, len(paths)) if folder is not None else None
    start = writer.done if writer else 0
    decoded: list[TokenFeatures | None] = []
    failures: list[tuple[str, str]] = []
    ok: list[bool] = []
    desc = f"image features (view {view})" if view else "image features"
    with ThreadPoolExecutor(max(1, workers)) as pool, torch.inference_mode():
        bar = tqdm(total=len(paths), initial=start, desc=desc, unit="img")
        for begin in range(start, len(paths), batch_size):
            chunk = paths[begin : begin + batch_size]
            images = list(pool.map(read, chunk))
            good = [im for im in images if not isinstance(im, Exception)]
            feats = model.image_features(model.preprocess_images(good).to(model.device)) if good else None
            rows: list[TokenFeatures | None] = []
            row = 0
            for path, image in zip(chunk, images):
                if isinstance(image, Exception):
                    failures.append((str(path), str(image)))
                    rows.append(None)
                    continue
                rows.append(TokenFeatures(*(t[row : row + 1] for t in (feats.tokens, feats.mask, feats.pooled))))
                row += 1
            if writer:
                writer.write(begin, rows)
            else:
                decoded.extend(rows)
                ok.extend(r is not None for r in rows)
            bar.update(len(chunk))
        bar.close()
    if writer:
        feats = writer.finish()
        return feats, _failed(paths, feats)
    first = next((f for f in decoded if f is not None), None)
    if first is None:
        raise RuntimeError("no image could be decoded")
    zero = TokenFeatures(*(torch.zeros_like(t) for t in (first.tokens, first.mask, first.pooled)))
    tokens, mask, pooled = _concat([f if f is not None else zero for f in decoded])
    return CachedFeatures(tokens, mask, pooled, torch.tensor(ok)), failures


def _failed(paths: Sequence[Path], feats: CachedFeatures) -> list[tuple[str, str]]:
    """(path, reason) of the images a cache folder holds as not decoded."""
    return [(str(p), "failed to decode") for p, ok in zip(paths, feats.ok.tolist()) if not ok]


class _FeatureWriter:
    """Rows of image features written into preallocated ``.npy`` memory maps in ``FOLDER.partial``, with the
    count of rows flushed so far in ``progress.json`` (written after the arrays are flushed, so a crash at any
    point leaves a count that the arrays hold); :meth:`finish` renames the folder into place."""

    def __init__(self, folder: Path, stamp: str, rows: int) -> None:
        self.folder, self.stamp, self.rows = folder, stamp, rows
        self.partial = folder.with_name(folder.name + ".partial")
        self.arrays: dict[str, np.ndarray] | None = None
        self.done = 0
        try:
            progress = json.loads((self.partial / "progress.json").read_text())
            if progress.get("stamp") == stamp and progress.get("rows") == rows:
                self.arrays = {n: np.load(self.partial / f"{n}.npy", mmap_mode="r+") for n in FEATURE_FILES}
                self.done = int(progress["done"])
        except (OSError, ValueError, KeyError):
            self.arrays, self.done = None, 0
        if self.arrays is None:
            shutil.rmtree(self.partial, ignore_errors=True)

    def _allocate(self, sample: TokenFeatures) -> dict[str, np.ndarray]:
        self.partial.mkdir(parents=True, exist_ok=True)
        shapes = {"tokens": (sample.tokens.shape[1], sample.tokens.shape[2], np.float16),
                  "mask": (sample.mask.shape[1], np.bool_), "pooled": (sample.pooled.shape[1], np.float16),
                  "ok": (np.bool_,)}
        return {n: np.lib.format.open_memmap(self.partial / f"{n}.npy", mode="w+", dtype=spec[-1],
                                             shape=(self.rows, *spec[:-1]))
                for n, spec in shapes.items()}

    def write(self, begin: int, rows: list[TokenFeatures | None]) -> None:
        sample = next((r for r in rows if r is not None), None)
        if self.arrays is None:
            if sample is None:  # nothing decoded yet: nothing to size the arrays by (the rows stay zeros)
                return
            self.arrays = self._allocate(sample)
        a = self.arrays
        for i, r in enumerate(rows, start=begin):
            a["ok"][i] = r is not None
            if r is not None:
                width = min(r.tokens.shape[1], a["tokens"].shape[1])
                a["tokens"][i, :width] = r.tokens[0, :width].half().cpu().numpy()
                a["mask"][i, :width] = r.mask[0, :width].cpu().numpy()
                a["pooled"][i] = r.pooled[0].half().cpu().numpy()
        for array in a.values():
            array.flush()
        self.done = begin + len(rows)
        tmp = self.partial / "progress.json.tmp"
        tmp.write_text(json.dumps({"stamp": self.stamp, "rows": self.rows, "done": self.done}))
        tmp.replace(self.partial / "progress.json")

    def finish(self) -> CachedFeatures:
        if self.arrays is None:
            raise RuntimeError("no image could be decoded")
        for array in self.arrays.values():
            array.flush()
        (self.partial / "stamp.json").write_text(json.dumps({"stamp": self.stamp, "rows": self.rows}))
        (self.partial / "progress.json").unlink(missing_ok=True)
        self.arrays = None
        shutil.rmtree(self.folder, ignore_errors=True)
        self.partial.replace(self.folder)
        feats = CachedFeatures.open(self.folder, self.stamp)
        assert feats is not None
        return feats


def _cached_features(cached: Path | None, compute: Callable[[], list[TokenFeatures]], stamp: str = "") -> CachedFeatures:
    """The features saved in the cache folder ``cached``, else ``compute()``'s batches concatenated (and saved
    there)."""
    feats = CachedFeatures.open(cached, stamp) if cached else None
    if feats is not None:
        return feats
    tokens, mask, pooled = _concat(compute())
    feats = CachedFeatures(tokens, mask, pooled, torch.ones(len(tokens), dtype=torch.bool))
    if cached:
        feats.save(cached, stamp)
    return feats


def mosaic_features(
    model: AlignModel, paths: Sequence[Path], mosaics: Sequence[Mosaic], cache_dir: Path | None, batch_size: int = 32,
) -> CachedFeatures:
    """Backbone region features of the mosaics of ``paths`` (see :mod:`models.mosaic`), cached like images'."""
    stamp = [f"{p}:{p.stat().st_size}" for p in paths] + [",".join(map(str, m.items)) for m in mosaics]
    key = _cache_key("mosaic", model.config.image_backbone.__dict__, stamp)

    @torch.inference_mode()
    def compute() -> list[TokenFeatures]:
        return [model.image_features(model.preprocess_images(make_mosaics(paths, mosaics[i : i + batch_size]))
                                     .to(model.device))
                for i in tqdm(range(0, len(mosaics), batch_size), desc="mosaic features", unit="batch")]

    return _cached_features(cache_dir / f"mosaic-{key}" if cache_dir else None, compute, preprocessing_stamp(model))


def text_features(
    model: AlignModel, texts: Sequence[str], cache_dir: Path | None, batch_size: int = 128
) -> CachedFeatures:
    """Backbone word-piece features of ``texts`` (padded to the longest)."""
    key = _cache_key("text", model.config.text_backbone.__dict__, texts)

    @torch.inference_mode()
    def compute() -> list[TokenFeatures]:
        return [model.text_features(model.tokenize(texts[i : i + batch_size]).to(model.device))
                for i in tqdm(range(0, len(texts), batch_size), desc="text features", unit="batch")]

    return _cached_features(cache_dir / f"text-{key}" if cache_dir else None, compute)


class LiveImageFeatures:
    """Image features computed on every batch (with gradients), for fine-tuning the backbone's top layers.

    Keeps the preprocessed pixels in memory instead of cached features; same ``batch`` interface. ``view`` > 0
    keeps the same seeded augmented view of every image that ``image_features`` caches for that view."""

    def __init__(self, model: AlignModel, paths: Sequence[Path], view: int = 0) -> None:
        self.model = model
        pixels, ok, self.failures = [], [], []
        for path in tqdm(paths, desc=f"decode images (view {view})" if view else "decode images", unit="img"):
            try:
                pixels.append(model.preprocess_images([_view_of(load_image(path), path, view)])[0])
                ok.append(True)
            except (ImageDecodeError, OSError) as exc:
                self.failures.append((str(path), str(exc)))
                pixels.append(None)
                ok.append(False)
        template = next(p for p in pixels if p is not None)
        self.pixels = torch.stack([p if p is not None else torch.zeros_like(template) for p in pixels])
        self.ok = torch.tensor(ok)

    def batch(self, index: torch.Tensor, device: torch.device | str) -> TokenFeatures:
        with torch.inference_mode(False), torch.enable_grad():
            return self.model.image_features(self.pixels[index].to(device))


class LiveTextFeatures:
    """Text features computed on every batch (with gradients), for fine-tuning the text backbone."""

    def __init__(self, model: AlignModel, texts: Sequence[str]) -> None:
        self.model, self.texts = model, list(texts)
        self.ok = torch.ones(len(texts), dtype=torch.bool)

    def batch(self, index: torch.Tensor, device: torch.device | str) -> TokenFeatures:
        tok = self.model.tokenize([self.texts[i] for i in index.tolist()]).to(device)
        with torch.inference_mode(False), torch.enable_grad():
            return self.model.text_features(tok)
