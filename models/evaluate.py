"""Evaluate a model on a captioned image split (``alignsearch eval``)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from .data import load_dataset, select_split
from .evaluation import evaluate_scores
from .model import AlignModel, EncoderOutput
from .preprocess import ImageDecodeError, load_image


def encode_image_files(model: AlignModel, paths: list[Path], batch_size: int = 32,
                       progress: bool = True) -> tuple[EncoderOutput, list[int], list[tuple[str, str]]]:
    """Encode image files; returns the output, the positions that decoded, and (path, reason) failures."""
    parts, kept, failures = [], [], []
    for start in tqdm(range(0, len(paths), batch_size), desc="encode images", unit="batch", disable=not progress):
        images = []
        for i, path in enumerate(paths[start : start + batch_size], start):
            try:
                images.append(load_image(path))
                kept.append(i)
            except (ImageDecodeError, OSError) as exc:
                failures.append((str(path), str(exc)))
        if images:
            parts.append(model.encode_images(images, batch_size))
    if not parts:
        raise RuntimeError("no image could be decoded")
    return EncoderOutput.concat(parts), kept, failures


def evaluate_dataset(model: AlignModel, dataset: Path, images_dir: Path, split: str = "test",
                     candidates: int = 20, val_size: int = 100, seed: int = 0,
                     progress: bool = True) -> dict:
    """Recall@1/5/10 and rsum for global, exhaustive and two-stage ranking on ``split``."""
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder not found: {images_dir}")
    records = select_split(load_dataset(dataset), split, val_size, seed)
    images, kept, failures = encode_image_files(model, [images_dir / r.filename for r in records], progress=progress)
    records = [records[i] for i in kept]
    captions = [c for r in records for c in r.captions]
    text_to_image = torch.tensor([i for i, r in enumerate(records) for _ in r.captions])
    texts = model.encode_texts(captions)
    global_scores = texts.global_emb @ images.global_emb.T
    fused = model.scores(texts, images)
    results = evaluate_scores(global_scores, fused, text_to_image, candidates)
    return {"results": results, "images": len(records), "captions": len(captions),
            "skipped": [p for p, _ in failures]}
