"""``alignsearch index build | add | delete | info | verify``."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from alignsearch.console import require_file, require_folder
from alignsearch.models.cli import add_progress_option, apply_progress_option, image_input

from .allocator import keep_freed_memory
from .layout import DEFAULT_CODEC, MANIFEST

BUILD_HINT = "alignsearch index build --images DIR [--captions FILE] --out {}"


def require_index(path: Path) -> Path:
    """``path`` if it is an index folder; otherwise an error that says what it is and how to make one."""
    if not path.exists():
        raise FileNotFoundError(f"no index at {path}: build one with `{BUILD_HINT.format(path)}`")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not an index: an index is the folder that "
                                 f"`alignsearch index build --out FOLDER` writes")
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path} is a folder but not an alignsearch index (it has no {MANIFEST}): "
                                f"build one with `{BUILD_HINT.format(path)}`")
    return path


def _encoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=Path,
                   help="folder of photos, searched recursively: JPEG, PNG, WebP, BMP, GIF, TIFF, AVIF where Pillow "
                        "reads it, HEIC/HEIF with pip install 'alignsearch[heic]'; with --features, only where the "
                        "server finds the photos to show (optional)")
    p.add_argument("--features", type=Path, metavar="DIR",
                   help="for a model whose image backbone is precomputed:D: region features read instead of photos, "
                        "DIR/<image name>.npy or DIR/<split>.npy with DIR/<split>.ids.txt; image ids are the "
                        "captions' image names (docs/precomputed-features.md)")
    p.add_argument("--captions", type=Path,
                   help="image,caption CSV (other columns kept as metadata), Karpathy JSON, or JSON lines "
                        "({'image': ..., 'caption': ...}); a caption whose image is not indexed is kept as a "
                        "standalone caption, and linked if its image is added later")
    p.add_argument("--metadata", type=Path, default=None,
                   help="JSON lines of photos' fields to filter on: {\"image\": ID, FIELD: VALUE or [VALUES], ...} "
                        "(numbers, ISO dates, true/false, text); with index add, also updates indexed photos' fields")
    p.add_argument("--model", default=None, help="model folder or shipped name (default: the shipped default)")
    p.add_argument("--batch-size", type=int, default=32, help="images (or captions) per forward pass")
    p.add_argument("--workers", type=int, default=4, help="image-decoding worker processes (threads for a features-only model)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--shard-size", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bars of the encoding itself")
    add_progress_option(p)


def _codec_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--local-codec", default=DEFAULT_CODEC,
                   help="codec of the per-region / per-word vectors: a FAISS standalone-codec factory string for "
                        "both collections (SQfp16: 37.6 kB of region codes per photo; SQ8: 18.8 kB; PQ64, "
                        "OPQ64,PQ64, ...) or a preset: compact (photos PQ64, 3.1 kB; captions SQfp16)")


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", choices=("faiss", "qdrant"), default="faiss",
                   help="where the vectors live: FAISS files in the index folder, or one Qdrant collection per side")
    p.add_argument("--qdrant-url", default=None,
                   help="with --store qdrant: a Qdrant server or cluster, e.g. http://localhost:6333 (API key from "
                        "$QDRANT_API_KEY)")
    p.add_argument("--qdrant-path", type=Path, default=None,
                   help="with --store qdrant: a folder for an embedded Qdrant (its core in this process)")
    p.add_argument("--qdrant-quantization", choices=("none", "scalar", "binary"), default="none",
                   help="with --store qdrant: Qdrant's own quantization of the region / word multivectors")


def _index_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", type=Path, help="index folder (the --out of `alignsearch index build`)")


def add_index_parser(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index", help="build and maintain an on-disk index",
                           description="The two-level index: global vectors in FAISS, per-region and per-word "
                                       "vectors in a FAISS-coded memory-mapped store, metadata in SQLite.")
    isub = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    p = isub.add_parser("build", help="encode a folder of images (and captions) into a new index",
                        description="Encode a folder of images (and captions) into a new index folder. Work "
                                    "happens in OUT.partial/, so an interrupted build resumes where it stopped; "
                                    "the finished index replaces OUT in one step.")
    _encoding_args(p)
    p.add_argument("--out", type=Path, required=True, help="index folder to write (replaced atomically)")
    p.add_argument("--faiss-factory", default=None,
                   help="FAISS index-factory string for the global vectors (default: chosen from size and memory)")
    _codec_arg(p)
    p.add_argument("--memory-budget-gb", type=float, default=4.0, help="memory the global index may use")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="where images are decoded and encoded: this process, or a Ray cluster (Ray Data decode "
                        "tasks, an actor pool of encoders, one GPU each where there are GPUs; pip install "
                        "'alignsearch[ray]'); the shards, the assembled index and resuming are the same")
    p.add_argument("--ray-address", default=None,
                   help="with --engine ray: the cluster (HOST:PORT, ray://HOST:PORT or auto); default: a local "
                        "Ray instance started for this build")
    _store_args(p)
    p.set_defaults(func=run_build)

    p = isub.add_parser("add", help="add new images / captions to an index without a rebuild")
    _index_arg(p)
    _encoding_args(p)
    p.set_defaults(func=run_add)

    p = isub.add_parser("delete", help="delete images or captions by id (they never come back from a search)",
                        description="Delete images or captions by id. Unknown ids are named on stderr; when none "
                                    "of the ids is in the index nothing is rewritten and the exit status is 1.")
    _index_arg(p)
    p.add_argument("--ids", nargs="+", required=True, metavar="ID",
                   help="image ids (their paths under the images folder, as search results show them) "
                        "or caption ids")
    p.set_defaults(func=run_delete)

    p = isub.add_parser("info", help="counts, bytes per item, model, FAISS types")
    _index_arg(p)
    p.set_defaults(func=run_info)

    p = isub.add_parser("verify", help="check checksums and that FAISS, local store and SQLite agree")
    _index_arg(p)
    p.add_argument("--seal", action="store_true",
                   help="seal a manifest written before manifests were sealed, if everything else verifies")
    p.set_defaults(func=run_verify)


def _options(args: argparse.Namespace, out: Path):
    from .build import BuildOptions

    options = BuildOptions(images=args.images, features=args.features, out=out, captions=args.captions,
                           metadata=args.metadata, batch_size=args.batch_size,
                           workers=args.workers, shard_size=args.shard_size,
                           faiss_factory=getattr(args, "faiss_factory", None),
                           local_codec=getattr(args, "local_codec", DEFAULT_CODEC),
                           memory_budget_gb=getattr(args, "memory_budget_gb", 4.0), progress=not args.quiet)
    return replace(options, **_store_fields(args))


def _store_fields(args: argparse.Namespace) -> dict:
    """The build options that ``--store`` and its ``--qdrant-*`` settings set (none for FAISS)."""
    store = getattr(args, "store", "faiss")
    qdrant = {"--qdrant-url": getattr(args, "qdrant_url", None), "--qdrant-path": getattr(args, "qdrant_path", None)}
    if store != "qdrant":
        given = [name for name, value in qdrant.items() if value]
        if given or getattr(args, "qdrant_quantization", "none") != "none":
            raise ValueError(f"{' and '.join(given) or '--qdrant-quantization'} needs --store qdrant")
        return {}
    from . import qdrant_store

    if getattr(args, "local_codec", DEFAULT_CODEC) != DEFAULT_CODEC:
        raise ValueError("--local-codec does not apply to --store qdrant (see --qdrant-quantization)")
    path = qdrant["--qdrant-path"]
    settings = qdrant_store.QdrantSettings(url=qdrant["--qdrant-url"], path=str(path) if path else None)
    settings.engine()  # a server that cannot be reached fails here, before any encoding
    return {"backend": qdrant_store.QdrantGlobalBackend(settings),
            "local_backend": qdrant_store.QdrantLocalBackend(settings), "local_codec": args.qdrant_quantization,
            "faiss_factory": getattr(args, "faiss_factory", None) or qdrant_store.NAME}


def _summary(report: dict) -> None:
    """The build report as JSON on stdout; the skipped items (the first 20) and the photo files of formats it
    could not read (``not_read``, with what reads them) on stderr."""
    from .reader import unread_note

    skipped = report.pop("skipped", [])
    report.pop("added_ids", None)  # for callers that answer per photo (the HTTP writes), not for a summary
    note = unread_note(Counter(report.pop("not_read", {})))
    print(json.dumps({**report, "skipped": len(skipped)}, indent=2))
    for item in skipped[:20]:
        print(f"skipped {item['item']}: {item['reason']}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"... and {len(skipped) - 20} more (see build_report.json)", file=sys.stderr)
    if note:
        print(note, file=sys.stderr)


def _check_inputs(args: argparse.Namespace) -> None:
    """The photo and/or features folder and the captions file exist: checked before anything heavy is imported."""
    if args.images is None and args.features is None:
        raise ValueError("give --images DIR (photos) or --features DIR (precomputed region features)")
    if args.features is not None:
        require_folder(args.features, "features folder")
    if args.images is not None:
        require_folder(args.images, "images folder")
    if args.captions:
        require_file(args.captions, "captions file")
    if getattr(args, "metadata", None):
        require_file(args.metadata, "metadata file")


def run_build(args: argparse.Namespace) -> int:
    _check_inputs(args)  # the paths first: no model or FAISS loads for a typo
    if args.out.exists() and not args.out.is_dir():
        raise FileExistsError(f"--out {args.out} is a file; the index is a folder: pick another --out")
    from alignsearch.models.preprocess import IMAGE_EXTENSIONS

    from .reader import scan_images, unread_note

    files, unread = scan_images(args.images) if args.features is None else ([], Counter())
    if not files and args.features is None and not args.captions:  # checked before any model loads or folder appears
        note = unread_note(unread)
        raise FileNotFoundError(f"no images in {args.images} or its subfolders (looked for "
                                f"{' '.join(IMAGE_EXTENSIONS)}) and no --captions: nothing to index"
                                + (f"; {note}" if note else ""))
    if args.ray_address and args.engine != "ray":
        raise ValueError("--ray-address goes with --engine ray")
    if args.features is not None and args.engine == "ray":
        raise ValueError("--engine ray decodes photos; a build from --features runs with --engine local")
    options = _options(args, args.out)
    if args.engine == "ray":
        from .ray_engine import preflight

        preflight(args.ray_address)  # before the model loads
    from alignsearch.models.factory import load_model

    from .build import build

    apply_progress_option(args)
    keep_freed_memory()
    model = load_model(args.model, device=args.device)
    with _distributor(args, model) as distributor:  # None: the local engine
        _summary(build(model, replace(options, distributor=distributor)))
    return 0


def _distributor(args: argparse.Namespace, model):
    """A context giving the build's distributor: a Ray one that connects on entry, or None (local)."""
    if args.engine != "ray":
        return nullcontext(None)
    from .ray_engine import RayDistributor, RaySettings

    return RayDistributor(model, RaySettings(address=args.ray_address, progress=not args.quiet), args.batch_size)


def run_add(args: argparse.Namespace) -> int:
    require_index(args.index)
    _check_inputs(args)  # before anything heavy is imported
    from alignsearch.models.factory import load_model

    from .layout import read_manifest
    from .update import add

    manifest = read_manifest(args.index)
    apply_progress_option(args)
    keep_freed_memory()
    model = load_model(args.model or manifest["model"].get("source"), device=args.device)
    _summary(add(model, args.index, _options(args, args.index)))
    return 0


def run_delete(args: argparse.Namespace) -> int:
    from .update import delete

    report = delete(require_index(args.index), args.ids)
    unknown = report["not_found"]
    if unknown:
        print(f"not in {args.index}: {', '.join(unknown)}", file=sys.stderr)
    if len(unknown) == len(set(args.ids)):
        print(f"nothing deleted: none of the ids is in {args.index} (the index was not changed)", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from .index import Index

    print(json.dumps(Index(require_index(args.index), check="size", use_gpu=False).info(), indent=2))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from .index import verify

    problems = verify(require_index(args.index), seal=args.seal)
    if problems:
        for p in problems:
            print(f"FAILED {p}", file=sys.stderr)
        return 1
    print(f"OK {args.index}")
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="Recall@K for global, exhaustive and two-stage search",
                       description="Recall@1/5/10 both ways and rsum, as the papers count them, for global-only, exhaustive and two-stage search. The split is indexed with the same build and queried with the same search code as the service.")
    p.add_argument("--dataset", type=Path, required=True, help="Karpathy-format JSON, or an image,caption CSV")
    p.add_argument("--images", type=Path, help="folder holding the images the dataset names")
    p.add_argument("--features", type=Path, metavar="DIR",
                   help="instead of --images, for a precomputed:D model: region features, DIR/<image name>.npy or "
                        "DIR/<split>.npy with DIR/<split>.ids.txt (docs/precomputed-features.md)")
    p.add_argument("--split", default="test", help="test (default), val (carved from train), train, ...")
    p.add_argument("--model", default=None, help="model folder or shipped name (default: the shipped default)")
    p.add_argument("--candidates", type=int, default=20, help="first-stage K for two-stage search")
    _codec_arg(p)
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    _store_args(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars of the encoding itself")
    add_progress_option(p)
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from alignsearch.models.data import load_dataset  # reads the file with the standard library only

    require_file(args.dataset, "dataset file")  # the paths and the dataset first, before anything heavy loads
    image_input(args)  # exactly one of --images / --features, an existing folder
    load_dataset(args.dataset)
    store = _store_fields(args)  # and the store settings
    from alignsearch.models.evaluation import format_table
    from alignsearch.models.factory import load_model

    from .evaluate import evaluate_split

    apply_progress_option(args)
    model = load_model(args.model, device=args.device)
    report = evaluate_split(model, args.dataset, args.images, args.split, args.candidates, progress=not args.quiet,
                            local_codec=args.local_codec, store=store, features=args.features)
    report.update(model=model.source, fingerprint=model.fingerprint, split=args.split, candidates=args.candidates,
                  local_codec=args.local_codec)
    print(f"model {model.source} ({model.fingerprint}), split {args.split}: "
          f"{report['images']} images, {report['captions']} captions, two-stage K={args.candidates}, "
          f"rerank kernel {report['rerank_kernel']}")
    print(format_table(report["results"]))
    sizes = report["bytes_per_item"]
    print(f"local codes ({args.local_codec}): {sizes['images']['local']:,.0f} bytes per image, "
          f"{sizes['captions']['local']:,.0f} per caption")
    for item in report["skipped"]:
        print(f"skipped: {item}")
    if args.json:
        meta = {k: v for k, v in report.items() if k != "results"}
        args.json.write_text(json.dumps({**report["results"], "meta": meta}, indent=2))
    return 0
