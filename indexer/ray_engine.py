"""The Ray engine of ``index build`` (``--engine ray``): a distributor whose encode stage runs on Ray Data.

Images: the plan's file paths -> a Ray Dataset -> decode and resize in Ray Data map tasks (CPU, anywhere in
the cluster; uint8 pixels travel, a quarter of the float bytes) -> ``map_batches`` on an actor pool of
encoders (one GPU per actor where the cluster has GPUs, half a CPU otherwise, so Ray Data's read and decode
tasks keep the rest) -> the rows stream back to the driver, which writes each shard in the usual format
(:mod:`indexer.writer`) as soon as all its items are in. Captions go through the same actor pool without a
decode stage. The assemble stage and the atomic swap are the local build's (:mod:`indexer.build`), and so is
resuming: finished shards are skipped, so a build killed mid-way resumes from them.

Ray is imported here only (``pip install 'alignsearch[ray]'``); ``alignsearch --help`` never loads it.
"""

from __future__ import annotations

import logging
import re
import socket
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from alignsearch.models.model import AlignModel
from alignsearch.models.preprocess import ImageDecodeError, ImagePreprocessor

from .distributor import Mapper
from .plan import ShardTask
from .reaper import Reaper
from .writer import Shard, empty_shard, is_done, write_shard

RAY_MISSING = "the Ray engine needs Ray: pip install 'alignsearch[ray]' (or 'ray[data]')"
CONNECT_TIMEOUT_S = 5.0


def image_preprocessor(model: AlignModel) -> ImagePreprocessor:
    """The model's image preprocessing (picklable: the decode tasks get it without the model)."""
    pre = model.image_preprocessor
    if not isinstance(pre, ImagePreprocessor):
        raise TypeError("this model reads precomputed region features, not image files")
    return pre


def preflight(address: str | None) -> None:
    """Before any model loads: Ray is installed and ``address`` answers (one-line errors otherwise)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ImportError(RAY_MISSING) from None
    check_address(address)


def check_address(address: str | None) -> None:
    """Fail in one line, within seconds, when nothing answers at ``address`` (``HOST:PORT`` or
    ``ray://HOST:PORT``; ``auto`` and no address are left to Ray: it finds or starts a local instance)."""
    if not address or address == "auto":
        return
    hostport = address.removeprefix("ray://").rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--ray-address must be HOST:PORT, ray://HOST:PORT or auto, not {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConnectionError(f"no Ray cluster answers at {hostport}: {exc.strerror or exc}") from None


def last_line(exc: BaseException) -> str:
    """The last non-empty line of a Ray error (the remote exception's own ``Type: message``), colours off."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


@dataclass
class RaySettings:
    """How the encode stage uses the cluster. ``None``: chosen from the cluster's resources."""

    address: str | None = None  # None: join the running instance of this process, else start a local one
    actors: int | None = None  # encoder actors: one per GPU; on CPUs one per 8 CPUs (at least one)
    actor_cpus: float = 0.5  # CPUs reserved per CPU actor: the rest stays free for the decode tasks
    encoder_threads: int | None = None  # torch threads of a CPU actor (default: the node's CPUs - 1)
    progress: bool = True


def decode_batch(batch: dict[str, np.ndarray], folder: str, pre: ImagePreprocessor) -> dict[str, np.ndarray]:
    """Ray Data map task: read and resize the batch's files (``rel`` column); a file that fails has an
    ``error`` (the local build's reasons) and zero pixels."""
    rels = batch["rel"]
    pixels = np.zeros((len(rels), pre.size, pre.size, 3), np.uint8)
    size = np.zeros((len(rels), 2), np.int64)
    errors = []
    for i, rel in enumerate(rels):
        try:
            pixels[i], size[i] = pre.load_file(Path(folder) / str(rel))
            errors.append("")
        except (ImageDecodeError, OSError) as exc:
            errors.append(str(exc) or type(exc).__name__)
    return {"shard": batch["shard"], "pos": batch["pos"], "pixels": pixels, "size": size,
            "error": np.array(errors, dtype=object)}


class Encoder:
    """Ray Data actor: loads the model once (from the same folder as the driver; its fingerprint must
    match), then encodes batches of pixels or of caption texts. ``local`` comes back padded (fp16, as
    shards store it) with each row's ``length``."""

    def __init__(self, source: str, fingerprint: str, threads: int | None) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        from alignsearch.models.factory import load_model

        from .allocator import keep_freed_memory

        keep_freed_memory()  # an encoder process, as the local build's (indexer/allocator.py)
        if threads:
            torch.set_num_threads(threads)
        hf_logging.disable_progress_bar()  # one bar per worker would interleave with the driver's
        self.model = load_model(source, device="auto")  # a GPU where Ray gave this actor one
        if self.model.fingerprint != fingerprint:
            raise RuntimeError(f"the model at {source} on this Ray node is not the one the build started with "
                               f"(fingerprint {self.model.fingerprint}, expected {fingerprint})")
        self.pre = image_preprocessor(self.model) if self.model.takes_images else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, dim = len(batch["pos"]), self.model.embed_dim
        if "text" in batch:
            out = self.model.encode_texts([str(t) for t in batch["text"]], batch_size=max(n, 1))
            good = np.ones(n, bool)
        else:
            good = np.array([not e for e in batch["error"]], bool)
            out = self.model.encode_pixels(self.pre.normalize_tensor(batch["pixels"][good])).cpu() \
                if good.any() else None
        glob = np.zeros((n, dim), np.float32)
        width = out.local.shape[1] if out is not None else 1
        local = np.zeros((n, width, dim), np.float16)
        length = np.zeros(n, np.int64)
        if out is not None:
            glob[good] = out.global_emb.numpy()
            mask = out.mask.numpy()
            for row, i in enumerate(np.flatnonzero(good)):  # the mask's vectors first (a text's may skip [CLS])
                length[i] = mask[row].sum()
                local[i, : length[i]] = out.local[row].numpy()[mask[row]]
        rest = {k: batch[k] for k in ("size", "error") if k in batch}
        return {"shard": batch["shard"], "pos": batch["pos"], "global": glob, "local": local, "length": length,
                **rest}


class EncodedRow(NamedTuple):
    """One item back from the encoders: its vectors, an image's (width, height), or why it was skipped."""

    global_vector: np.ndarray
    local: np.ndarray
    size: list[int] | None
    error: str


class ShardCollector:
    """Driver side: rows come back in any order; a shard is written once all its items are in."""

    def __init__(self, tasks: Sequence[ShardTask], work: Path, dim: int, progress: Callable[[int], None]) -> None:
        self.tasks = {t.number: t for t in tasks}
        self.rows: dict[int, dict[int, EncodedRow]] = defaultdict(dict)
        self.work, self.dim, self.progress = work, dim, progress
        for task in tasks:
            if not task.items:
                self.write(task)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for i, (shard, pos) in enumerate(zip(batch["shard"].tolist(), batch["pos"].tolist())):
            size = batch["size"][i].tolist() if "size" in batch else None
            error = str(batch["error"][i]) if "error" in batch else ""
            local = np.array(batch["local"][i][: int(batch["length"][i])])
            self.rows[shard][pos] = EncodedRow(np.array(batch["global"][i]), local, size, error)
        self.progress(len(batch["pos"]))
        for shard in [s for s, rows in self.rows.items() if len(rows) == len(self.tasks[s].items)]:
            self.write(self.tasks[shard])

    def write(self, task: ShardTask) -> None:
        rows = self.rows.pop(task.number, {})
        skipped = list(task.skipped)
        good, items = [], []
        for pos, item in enumerate(task.items):
            row = rows[pos]
            if row.error:
                skipped.append({"item": item, "reason": row.error})
                continue
            good.append(row)
            items.append(item if task.collection == "captions" else
                         {"id": item, "path": task.stored_path(item), "width": row.size[0], "height": row.size[1]})
        if not good:
            write_shard(self.work, task.collection, task.number, empty_shard(self.dim, skipped))
            return
        write_shard(self.work, task.collection, task.number, Shard(
            np.stack([r.global_vector for r in good]), np.concatenate([r.local for r in good]).astype(np.float16),
            np.array([len(r.local) for r in good], np.int64), items, skipped))

    def pending(self) -> list[int]:
        return sorted(self.rows)


def _rows(tasks: Sequence[ShardTask]) -> Iterator[dict[str, Any]]:
    for task in tasks:
        for pos, item in enumerate(task.items):
            if task.collection == "images":
                yield {"shard": task.number, "pos": pos, "rel": item}
            else:
                yield {"shard": task.number, "pos": pos, "text": item["text"]}


class RayDistributor:
    """A :class:`~indexer.distributor.Distributor` on a Ray cluster. Use it as a context manager: it
    connects on entry (to ``settings.address``, to the instance this process already joined, or to a new
    local one) and shuts down on exit only what it started."""

    def __init__(self, model: AlignModel, settings: RaySettings | None = None, batch_size: int = 32) -> None:
        if not model.source:
            raise ValueError("the Ray engine loads the model from its folder on each worker: this model has none")
        self.model, self.settings, self.batch_size = model, settings or RaySettings(), batch_size
        self.started = False
        self.reaper = Reaper(start=False)

    def __enter__(self) -> "RayDistributor":
        preflight(self.settings.address)
        import ray

        if not ray.is_initialized():
            self.reaper = Reaper()  # a killed build leaves no Ray process behind
            try:
                ray.init(address=self.settings.address, include_dashboard=False, logging_level="error",
                         log_to_driver=self.settings.progress)
            except ConnectionError as exc:
                self.reaper.close()
                raise ConnectionError(f"cannot join the Ray cluster at {self.settings.address}: "
                                      f"{str(exc).splitlines()[0]}") from None
            self.started = True
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours below counts items; Ray's bars per operator are noise
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # "execution finished", "bars disabled"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False
            self.reaper.close()

    def pool(self) -> dict[str, Any]:
        """``map_batches`` arguments of the encoder stage: an actor pool of one actor per GPU, or of CPU
        actors that leave CPUs to the decode tasks."""
        import ray
        from ray.data import ActorPoolStrategy

        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        s, model = self.settings, self.model
        if gpus:
            actors, resources, threads = s.actors or gpus, {"num_gpus": 1, "num_cpus": 1}, s.encoder_threads
        else:
            actors = s.actors or max(1, cpus // 8)
            resources, threads = {"num_cpus": s.actor_cpus}, s.encoder_threads or max(1, cpus // actors - 1)
        return {"fn": Encoder, "compute": ActorPoolStrategy(size=actors), **resources,
                "fn_constructor_kwargs": {"source": str(model.source), "fingerprint": model.fingerprint,
                                          "threads": threads}}

    def run(self, tasks: Sequence[ShardTask], work: Path, make_mapper: Callable[[], Mapper]) -> None:
        """Encode every unfinished task on the cluster and write its shard under ``work`` (``make_mapper``
        is not used: the stages are split into decode tasks and encoder actors here)."""
        import ray.data
        from tqdm import tqdm

        todo = [t for t in tasks if not is_done(work, t.collection, t.number)]
        if not todo:
            return
        total = sum(len(t.items) for t in tasks)
        kind = todo[0].collection
        with tqdm(total=total, initial=total - sum(len(t.items) for t in todo), desc=f"index {kind} (ray)",
                  unit="img" if kind == "images" else "cap", disable=not self.settings.progress or total == 0,
                  smoothing=0.1) as bar:
            collector = ShardCollector(todo, work, self.model.embed_dim, bar.update)
            rows = list(_rows(todo))
            if not rows:
                return
            size = self.batch_size if kind == "images" else max(self.batch_size, 64)  # as encode_captions
            ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // size, 10_000)))
            if kind == "images":
                ds = ds.map_batches(decode_batch, batch_size=size, fn_kwargs={
                    "folder": todo[0].folder, "pre": image_preprocessor(self.model)})
            ds = ds.map_batches(batch_size=size, **self.pool())
            batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
            try:
                for batch in batches:
                    collector.add(batch)
            except ray.exceptions.RayError as exc:  # a worker's traceback: its last line says what failed
                raise RuntimeError(f"the Ray build failed: {last_line(exc)}") from None
            finally:
                batches.close()  # on a failure too: stop the execution and free the actor pool now
        if collector.pending():
            raise RuntimeError(f"the Ray build returned incomplete {kind} shards {collector.pending()[:5]}")
