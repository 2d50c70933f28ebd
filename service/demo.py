"""``alignsearch demo``: index a few sample photos (or your own folder) with the default model and serve them.

The sample photos are the ones that ship inside scikit-image's wheel (``skimage/data``: nothing is
downloaded); their captions are ours, in ``demo_captions.jsonl`` beside this file. The index goes under
``~/.cache/alignsearch/demo`` (``$XDG_CACHE_HOME`` is honoured) and is reused while the photos, captions
and model are unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

from alignsearch.console import require_file, require_folder
from alignsearch.indexer.allocator import keep_freed_memory
from alignsearch.models.cli import add_progress_option, apply_progress_option

from .serve import add_allow_open_option, bind, refuse_open, run_app, serving_line, url
from .settings import Settings

DEMO_CAPTIONS = Path(__file__).resolve().parent / "demo_captions.jsonl"
# Photos inside the scikit-image wheel (skimage/data); the others in skimage.data are fetched with pooch.
SAMPLE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                 "motorcycle_right.png", "camera.png", "coins.png", "horse.png", "grass.png", "gravel.png",
                 "brick.png", "moon.png", "hubble_deep_field.jpg", "retina.jpg", "page.png")
CAPTION_NAMES = ("captions.csv", "captions.jsonl", "captions.json")


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "alignsearch" / "demo"


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="index sample photos (or --images DIR) and serve the search page",
                       description="Build a small index with the default model (scikit-image's sample photos "
                                   "and our captions for them, or your own folder), start the server and print "
                                   "the URL of the search page.")
    p.add_argument("--images", type=Path,
                   help="your own photo folder (default: the sample photos that come with scikit-image)")
    p.add_argument("--captions", type=Path,
                   help="captions for --images (CSV image,caption / JSON lines / Karpathy JSON; default: a "
                        "captions.csv|jsonl|json inside the folder, if there is one)")
    p.add_argument("--out", type=Path, default=None,
                   help="where the demo photos and indexes go (default: ~/.cache/alignsearch/demo)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    add_allow_open_option(p, Settings().allow_open)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--rebuild", action="store_true", help="rebuild the index even if an up-to-date one exists")
    p.add_argument("--no-serve", action="store_true", help="build the index, print where it is, and stop")
    add_progress_option(p)
    p.set_defaults(func=run_demo)


def sample_photos(target: Path) -> Path:
    """Copy scikit-image's bundled sample photos into ``target`` (they ship in its wheel: no download)."""
    try:
        import skimage
    except ImportError:
        raise ImportError("the demo photos come with scikit-image: pip install 'alignsearch[demo]' "
                          "(or point the demo at your own photos with --images DIR)") from None
    source = Path(skimage.__file__).resolve().parent / "data"
    missing = [name for name in SAMPLE_PHOTOS if not (source / name).is_file()]
    if len(missing) == len(SAMPLE_PHOTOS):
        raise FileNotFoundError(f"no sample photos in {source} (scikit-image {skimage.__version__}); "
                                "use --images DIR")
    target.mkdir(parents=True, exist_ok=True)
    for name in SAMPLE_PHOTOS:
        if name not in missing and not (target / name).is_file():
            shutil.copyfile(source / name, target / name)
    return target


def _find_captions(images: Path) -> Path | None:
    return next((images / name for name in CAPTION_NAMES if (images / name).is_file()), None)


def _stamp(images: Path, captions: Path | None, fingerprint: str) -> str:
    """What the index was built from: the model, and every photo's and the captions' name, size and mtime."""
    from alignsearch.indexer.reader import list_images

    def stat(path: Path) -> list:
        s = path.stat()
        return [str(path), s.st_size, s.st_mtime_ns]

    parts = [fingerprint, str(images.resolve()), [stat(images / f) for f in list_images(images)],
             stat(captions) if captions else None]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def prepare(args: argparse.Namespace):
    """Build (or reuse) the demo index; returns ``(index_dir, model)``."""
    out = args.out or default_cache()
    if args.images:
        images = require_folder(args.images.expanduser(), "images folder")
        captions = require_file(args.captions, "captions file") if args.captions else _find_captions(images)
        slug = hashlib.sha256(str(images.resolve()).encode()).hexdigest()[:10]
        index_dir = out / f"index-{images.resolve().name or 'photos'}-{slug}"
    else:
        if args.captions:
            raise ValueError("--captions goes with --images (the sample photos have their own captions)")
        images, captions = sample_photos(out / "photos"), DEMO_CAPTIONS
        index_dir = out / "index"

    from alignsearch.indexer.build import BuildOptions, build
    from alignsearch.models.factory import load_model

    apply_progress_option(args)
    keep_freed_memory()  # it builds, then serves (indexer/allocator.py)
    model = load_model(device=args.device)
    stamp_file = index_dir.with_name(index_dir.name + ".built-from")
    stamp = _stamp(images, captions, model.fingerprint)
    fresh = (index_dir / "manifest.json").is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp
    if fresh and not args.rebuild:
        print(f"using the demo index in {index_dir} (built before; --rebuild to build it again)", flush=True)
    else:
        print(f"indexing {images} {'with ' + str(captions) if captions else '(no captions)'} ...", flush=True)
        report = build(model, BuildOptions(images=images, out=index_dir, captions=captions))
        stamp_file.write_text(stamp)
        print(f"indexed {report['images_indexed']} images and {report['captions_indexed']} captions into "
              f"{index_dir} ({len(report['skipped'])} skipped)", flush=True)
    if not captions:
        print("no captions: image search (photo -> captions) will find nothing; pass --captions FILE", flush=True)
    return index_dir, model


def run_demo(args: argparse.Namespace) -> int:
    if args.no_serve:
        index_dir, _ = prepare(args)
        print(f"serve it with: alignsearch serve --index {index_dir}")
        return 0
    refuse_open(args.host, Settings().api_key, args.allow_open)
    sock = bind(args.host, args.port)  # a busy port is found before the model loads and the photos are indexed
    try:
        # built on the main thread, so that Ctrl-C stops the build cleanly; the server then runs the model on its
        # light thread beside the main thread's torch threads, the slower way (service/compute.py)
        index_dir, model = prepare(args)
        from alignsearch.indexer.search import Searcher

        from .app import create_app

        settings = Settings(index=index_dir, device=args.device)  # ALIGNSEARCH_API_KEY, if set, still applies
        searcher = Searcher.open(index_dir, model)  # the model that built it, already loaded
        print(serving_line(index_dir, searcher.index.manifest["counts"], args.host, args.port), flush=True)
        print(f"\n  alignsearch demo: open {url(args.host, args.port)} in a browser\n", flush=True)
        run_app(create_app(settings, searcher), sock, "warning")
    finally:
        sock.close()
    return 0

