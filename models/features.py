"""Frozen-backbone features for training, computed once and cached on disk (safetensors)."""

from __future__ import annotations

import hashlib
import zlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .backbones import TokenFeatures
from .model import AlignModel, _pad_tokens
from .mosaic import Mosaic, make_mosaics
from .preprocess import ImageDecodeError, augmented_view, load_image


@dataclass
class CachedFeatures:
    """Backbone features for a list of items, stored in float16; ``ok`` marks the items that decoded."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    ok: torch.Tensor

    def batch(self, index: torch.Tensor, device: torch.device | str) -> TokenFeatures:
        """Rows ``index`` in float32 on ``device``, the token axis cut to the longest row in the batch."""
        mask = self.mask[index]
        width = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
        return TokenFeatures(
            self.tokens[index, :width].to(device, torch.float32),
            mask[:, :width].to(device),
            self.pooled[index].to(device, torch.float32),
        )

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        save_file({"tokens": self.tokens, "mask": self.mask, "pooled": self.pooled, "ok": self.ok}, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "CachedFeatures":
        d = load_file(str(path))
        return cls(d["tokens"], d["mask"], d["pooled"], d["ok"])


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
    and are returned as (path, reason) pairs. ``view`` > 0 gives a seeded augmented view of every image."""
    stamp = [f"{p}:{p.stat().st_size}" if p.exists() else str(p) for p in paths]
    key = _cache_key(f"image-view{view}" if view else "image", model.config.image_backbone.__dict__, stamp)
    cached = cache_dir / f"image-{key}.safetensors" if cache_dir else None
    failures: list[tuple[str, str]] = []

    def read(path: Path):
        try:
            image = load_image(path)
            return _view_of(image, path, view)
        except (ImageDecodeError, OSError) as exc:
            return exc

    if cached and cached.is_file():
        feats = CachedFeatures.load(cached)
        failures = [(str(p), "failed to decode") for p, ok in zip(paths, feats.ok.tolist()) if not ok]
        return feats, failures
    decoded: list[TokenFeatures | None] = []
    ok: list[bool] = []
    with ThreadPoolExecutor(max(1, workers)) as pool, torch.inference_mode():
        bar = tqdm(total=len(paths), desc=f"image features (view {view})" if view else "image features", unit="img")
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            images = list(pool.map(read, chunk))
            good = [im for im in images if not isinstance(im, Exception)]
            feats = model.image_features(model.preprocess_images(good).to(model.device)) if good else None
            row = 0
            for path, image in zip(chunk, images):
                ok.append(not isinstance(image, Exception))
                if isinstance(image, Exception):
                    failures.append((str(path), str(image)))
                    decoded.append(None)
                    continue
                decoded.append(TokenFeatures(*(t[row : row + 1] for t in (feats.tokens, feats.mask, feats.pooled))))
                row += 1
            bar.update(len(chunk))
        bar.close()
    first = next((f for f in decoded if f is not None), None)
    if first is None:
        raise RuntimeError("no image could be decoded")
    zero = TokenFeatures(*(torch.zeros_like(t) for t in (first.tokens, first.mask, first.pooled)))
    tokens, mask, pooled = _concat([f if f is not None else zero for f in decoded])
    feats = CachedFeatures(tokens, mask, pooled, torch.tensor(ok))
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        feats.save(cached)
    return feats, failures


def _cached_features(cached: Path | None, compute: Callable[[], list[TokenFeatures]]) -> CachedFeatures:
    """The features saved at ``cached``, else ``compute()``'s batches concatenated (and saved there)."""
    if cached and cached.is_file():
        return CachedFeatures.load(cached)
    tokens, mask, pooled = _concat(compute())
    feats = CachedFeatures(tokens, mask, pooled, torch.ones(len(tokens), dtype=torch.bool))
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        feats.save(cached)
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

    return _cached_features(cache_dir / f"mosaic-{key}.safetensors" if cache_dir else None, compute)


def text_features(
    model: AlignModel, texts: Sequence[str], cache_dir: Path | None, batch_size: int = 128
) -> CachedFeatures:
    """Backbone word-piece features of ``texts`` (padded to the longest)."""
    key = _cache_key("text", model.config.text_backbone.__dict__, texts)

    @torch.inference_mode()
    def compute() -> list[TokenFeatures]:
        return [model.text_features(model.tokenize(texts[i : i + batch_size]).to(model.device))
                for i in tqdm(range(0, len(texts), batch_size), desc="text features", unit="batch")]

    return _cached_features(cache_dir / f"text-{key}.safetensors" if cache_dir else None, compute)


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
