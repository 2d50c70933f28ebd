"""Building an index (the runner): plan -> encode shards (distributed) -> assemble -> atomic swap.

1. plan: the image files and caption items cut into shard tasks, plain data (:mod:`indexer.plan`, ids by
   :mod:`indexer.caption_ids`);
2. encode: each task is a function of the model and the task (:mod:`indexer.encode`), run where the
   distributor decides (:mod:`indexer.distributor`), its shard written to the work folder
   (:mod:`indexer.writer`: the contract; finished shards survive a crash);
3. assemble: global-store and codec training, the stores, SQLite, the manifest (:mod:`indexer.assemble`);
4. swap: the finished folder replaces the target in one step (:func:`indexer.layout.replace_folder`).

Updates of an existing index are in :mod:`indexer.update`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from alignsearch.models.model import AlignModel
from alignsearch.models.precomputed import FeatureFolder, check_input

from . import layout, photo_fields
from .assemble import assemble_index
from .caption_ids import caption_items
from .distributor import Distributor, LocalDistributor, Mapper
from .encode import decode_pool, encode_task
from .layout import DEFAULT_CODEC
from .plan import caption_tasks, image_tasks
from .reader import CaptionRow, read_captions, scan_features, scan_images
from .stores import DEFAULT_GLOBAL, DEFAULT_LOCAL, GlobalBackend, LocalBackend, global_backend, local_backend
from .writer import Shard, read_shards

DEFAULT_SHARD_SIZE = 1024
REPORT = "build_report.json"


@dataclass
class BuildOptions:
    images: Path | None  # the photos; with ``features``, only where photos are served from (None: none are)
    out: Path
    captions: Path | None = None
    batch_size: int = 32
    workers: int = 4
    shard_size: int = DEFAULT_SHARD_SIZE
    faiss_factory: str | None = None
    local_codec: str = DEFAULT_CODEC
    memory_budget_gb: float = 4.0
    progress: bool = True
    files: list[str] | None = None  # index only these files of ``images`` (relative paths)
    metadata: Path | None = None  # JSON lines of photos' fields ({"image": id, FIELD: VALUE, ...})
    backend: str | GlobalBackend = DEFAULT_GLOBAL  # the global store's backend, a name or a configured one
    local_backend: str | LocalBackend = DEFAULT_LOCAL  # (see indexer.stores)
    distributor: Distributor | None = field(default=None, repr=False)  # None: LocalDistributor
    features: Path | None = None  # precomputed region features read instead of photos (models.precomputed)

    @property
    def source(self) -> Path:
        """The folder the image items are read from: the features, else the photos."""
        return self.features if self.features is not None else self.images

    @property
    def images_root(self) -> Path:
        """The index's images root: the photos' folder (the features' when there are no photos)."""
        return (self.images if self.images is not None else self.features).resolve()


class NothingIndexed(RuntimeError):
    """Every input was skipped."""


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_all(model: AlignModel, options: BuildOptions, files: list[str], work: Path, root: Path,
               captions: Callable[[set[str]], tuple[list[dict], list[dict]]]) -> dict[str, list[Shard]]:
    """Plan and encode ``files`` (relative to ``options.source``), then the caption items that ``captions``
    makes from the ids of the images indexed; returns the finished shards of both collections (memory-mapped).
    Shards already finished under ``work`` are kept."""
    distributor = options.distributor or LocalDistributor(options.progress)

    def mapper() -> Mapper:  # a distributed distributor builds one per worker
        pool = decode_pool(model, options.workers)  # its processes start on the first image task
        return lambda task, progress: encode_task(model, task, options.batch_size, options.workers, progress, pool)

    distributor.run(image_tasks(files, str(options.source.resolve()), str(root.resolve()), options.shard_size),
                    work, mapper)
    shards = {"images": read_shards(work, "images")}
    items, skipped = captions({item["id"] for s in shards["images"] for item in s.items})
    distributor.run(caption_tasks(items, skipped, options.shard_size), work, mapper)
    shards["captions"] = read_shards(work, "captions")
    return shards


def build(model: AlignModel, options: BuildOptions) -> dict[str, Any]:
    """Build (or resume building) the index at ``options.out``; returns the build report.

    Work happens in ``OUT.partial/`` beside the target: finished shards survive a crash and a rerun with the
    same inputs skips them; the finished index is swapped into place in one rename. Captions naming an image
    that is not indexed (absent or unreadable) are kept as standalone captions (``image`` kept in their
    metadata)."""
    check_input(model, options.features)
    caption_rows = read_captions(options.captions) if options.captions else []
    if options.features is not None:
        files, unread = scan_features(options.features, caption_rows), Counter()
    else:
        files, unread = scan_images(options.images)
    if options.files is not None:
        wanted = set(options.files)
        files = [f for f in files if f in wanted]
    if options.features is not None:  # a width that is not the model's fails here, before any encoding
        FeatureFolder(options.features).resolve(files[:32], model.image_backbone.feature_dim)
    fields = user_fields(caption_rows, options.metadata, {})  # a bad field fails before any encoding
    if options.faiss_factory:
        global_backend(options.backend).validate(options.faiss_factory, model.embed_dim)
    local_backend(options.local_backend).validate(options.local_codec, model.embed_dim)  # before any encoding
    options = replace(options, out=layout.real_path(options.out))  # through a symlink: the real index is rebuilt
    with layout.exclusive(options.out), layout.disk_full_is_one_line(options.out, _work(options.out)):
        return _build(model, options, files, caption_rows, unread, fields)


def user_fields(caption_rows: list[CaptionRow], metadata_file: Path | None, known: dict[str, str]
                ) -> dict[str, photo_fields.Raw]:
    """The photos' fields the user gives: the captions' extra columns, then the metadata file's (which win),
    by image id; checked against the types ``known`` (the index's and the built-in fields') so that a bad
    value fails before anything is encoded."""
    given = photo_fields.caption_fields(caption_rows)
    for image, fields in (photo_fields.read_metadata_file(metadata_file) if metadata_file else {}).items():
        given[image] = photo_fields.merged(given.get(image), fields)
    ids = list(given)
    photo_fields.typed({n: given[i] for n, i in enumerate(ids)}, {**photo_fields.BUILTIN_TYPES, **known},
                       dict(enumerate(ids)))
    return given


def _work(out: Path) -> Path:
    """Where the build of ``out`` keeps its shards (resumable) and assembles the new index."""
    return out.with_name(out.name + ".partial")


def _build(model: AlignModel, options: BuildOptions, files: list[str], caption_rows: list[CaptionRow],
           unread: Counter[str], fields: dict[str, photo_fields.Raw]) -> dict[str, Any]:
    work = _work(options.out)
    plan = {"model": model.fingerprint, "files": _digest(files), "captions": _digest([vars(r) for r in caption_rows]),
            "shard_size": options.shard_size, "images": str(options.images_root),
            "features": str(options.features.resolve()) if options.features is not None else None}
    plan_file = work / "build.json"
    if work.exists() and (not plan_file.is_file() or json.loads(plan_file.read_text()) != plan):
        shutil.rmtree(work)  # a different build was interrupted here: start over
    work.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(plan))

    shards = encode_all(model, options, files, work, options.images_root,
                        lambda known: caption_items(caption_rows, known))
    counts = {name: sum(len(s.items) for s in shards[name]) for name in layout.COLLECTIONS}
    report = {"images_indexed": counts["images"], "captions_indexed": counts["captions"],
              "skipped": [k for name in layout.COLLECTIONS for s in shards[name] for k in s.skipped],
              "not_read": dict(sorted(unread.items()))}  # photo files of formats this install cannot read
    if not counts["images"] and not counts["captions"]:
        shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming
        first = "; ".join(f"{k['item']}: {k['reason']}" for k in report["skipped"][:3])
        raise NothingIndexed(f"nothing was indexed: all {len(report['skipped'])} items were skipped ({first})")

    final = work / "index"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    assemble_index(final, model, shards, options.images_root, options.local_codec, options.faiss_factory,
                   options.memory_budget_gb * 1e9, global_backend(options.backend), local_backend(options.local_backend),
                   fields=fields)
    (final / REPORT).write_text(json.dumps(report, indent=2))
    layout.replace_folder(final, options.out)
    shutil.rmtree(work, ignore_errors=True)
    return report
