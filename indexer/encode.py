"""Encoding one shard task into a :class:`~indexer.writer.Shard`: a function of the model and the task only
(the mapper of the build). Images are decoded and resized in worker processes (:class:`~indexer.reader.DecodePool`):
a few batches ahead of an encoder on a GPU; taking turns with an encoder on the CPU (256 images decoded on every
core, then encoded with no decoder running), since a decoder beside it can stall its threads at their barriers
(docs/benchmarks.md, "Build throughput": measured, the gain is within the noise of a 2-core box). The encoder's process only
normalises them. Captions are encoded in order of length (batches of similar lengths pad little), then put back
in file order. A model whose image backbone is ``precomputed:D`` reads region arrays from its features folder
instead of decoding photos (:func:`~indexer.reader.feature_batches`), and skips the backbone forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from alignsearch.models.model import AlignModel, EncoderOutput
from alignsearch.models.precomputed import encode_arrays

from .plan import ShardTask
from .reader import DecodePool, Decoded, decode_batches, feature_batches
from .writer import Shard, ShardPart, empty_shard, shard_from_output, shard_from_parts, shard_part

Progress = Callable[[int], None]  # called with the number of items just done
# On a CPU, images decoded per turn before the encoder takes the cores back: 256 at 224 px are 38 MB of uint8.
TURN_IMAGES = 256


def encode_task(model: AlignModel, task: ShardTask, batch_size: int = 32, workers: int = 4,
                progress: Progress | None = None, pool: DecodePool | None = None) -> Shard:
    """The shard of ``task`` (items that fail to decode are listed in its ``skipped``). Images are decoded in
    ``pool`` when given (see :func:`decode_pool`), else in ``workers`` threads."""
    if task.collection == "images":
        return encode_images(model, task, batch_size, workers, progress or (lambda n: None), pool)
    return encode_captions(model, task, batch_size, workers, progress or (lambda n: None))


_SHARED_POOLS: dict[tuple, DecodePool] = {}


def decode_pool(model: AlignModel, workers: int) -> DecodePool | None:
    """Decode processes for ``model``'s images, or None when it takes precomputed features.

    One pool per setting (workers, input size, normalisation) is shared by every build of this process: starting
    the processes costs about a second (a Python interpreter each), paid once; they wait idle between builds
    and stop when the process exits."""
    preprocessor = model.image_preprocessor
    if preprocessor is None:
        return None
    key = (workers, preprocessor.size, tuple(preprocessor.mean.tolist()), tuple(preprocessor.std.tolist()))
    if key not in _SHARED_POOLS:
        _SHARED_POOLS[key] = DecodePool(workers, preprocessor)
    return _SHARED_POOLS[key]


def _encode(model: AlignModel, batch: list[Decoded], good: list[Decoded], pooled: bool) -> EncoderOutput:
    if not model.takes_images:  # precomputed region features
        return encode_arrays(model, [d.array for d in good])
    return model.encode_pixels(_pixels(model, batch, good, pooled)).cpu()


def _pixels(model: AlignModel, batch: list[Decoded], good: list[Decoded], pooled: bool) -> torch.Tensor:
    if pooled:  # uint8 arrays from the decode processes (stacked there): normalised in one step, on the device
        stacked = getattr(batch, "pixels", None)
        pixels = torch.from_numpy(stacked if stacked is not None else np.stack([d.array for d in good]))
        return model.image_preprocessor.normalize_tensor(_to_device(pixels, model.device))
    return torch.stack([d.array for d in good])


def _to_device(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 pixels onto the encoder's device before normalising (a quarter of float32's bytes; on CUDA from
    pinned memory, copied asynchronously); on the CPU they stay where they are."""
    if device.type == "cpu":
        return pixels
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    return pixels.to(device, non_blocking=True)


def encode_images(model: AlignModel, task: ShardTask, batch_size: int, workers: int, progress: Progress,
                  pool: DecodePool | None = None) -> Shard:
    folder = Path(task.folder or ".")
    prepare = lambda image: model.preprocess_images([image])[0]  # noqa: E731  (runs in the worker threads)
    batches = [task.items[i : i + batch_size] for i in range(0, len(task.items), batch_size)]
    parts: list[ShardPart] = []  # each batch's rows as the shard keeps them (float16 regions, no padding)
    items: list[dict[str, Any]] = []
    skipped = list(task.skipped)
    features = not model.takes_images  # the task's folder holds precomputed region features, read instead of decoded
    if features:
        decoded = feature_batches(folder, batches, model.image_backbone.feature_dim)
    elif pool is None:
        decoded = decode_batches(folder, batches, workers, prepare)
    else:  # on a CPU the encoder and the decoders take turns on the cores (see DecodePool.batches)
        turns = max(1, TURN_IMAGES // batch_size) if model.device.type == "cpu" else 0
        decoded = pool.batches(folder, batches, turns=turns)
    for batch in decoded:
        good = [d for d in batch if d.error is None]
        skipped += [{"item": d.rel, "reason": d.error} for d in batch if d.error is not None]
        if good:
            parts.append(shard_part(_encode(model, batch, good, pool is not None)))
            # features: the id is the photo's path under the index's images root (served if a photo is there)
            items += [_item(d, d.rel if features else task.stored_path(d.rel)) for d in good]
        progress(len(batch))
    if not parts:
        return empty_shard(model.embed_dim, skipped)
    return shard_from_parts(parts, items, skipped)


def _item(d: Decoded, path: str) -> dict[str, Any]:
    """A photo's shard item; with its file's facts when its decode process read them (assembly then reads
    nothing more of the file: :func:`~indexer.photo_fields.file_fields`)."""
    item = {"id": d.rel, "path": path, "width": d.width, "height": d.height}
    if d.file is not None:
        item["file"] = d.file
    return item


def encode_captions(model: AlignModel, task: ShardTask, batch_size: int, workers: int, progress: Progress) -> Shard:
    items = task.items
    if not items:
        return empty_shard(model.embed_dim, list(task.skipped))
    order = sorted(range(len(items)), key=lambda i: (len(items[i]["text"]), i))
    out = model.encode_texts([items[i]["text"] for i in order], batch_size=max(batch_size, 64))
    back = [0] * len(order)
    for position, i in enumerate(order):
        back[i] = position
    progress(len(items))
    return shard_from_output(out.select(back), items, list(task.skipped))
