"""Images/s of ``index build`` with the local engine and with the Ray engine on the same photos (images only),
with the machine's load average before and after each run (the machine may be shared: the figures say so).

    python -m alignsearch.bench.ray_build --images ../shared/datasets/flickr8k-800/images --limit 400

Each engine builds three times: a warm-up and then on ``--small`` images (its fixed cost: for Ray the actor start and the model load
in the actor) and on ``--limit`` images; ``steady_images_per_s`` is (limit - small) / (time - small time).
The Ray instance is started once (timed apart) before both Ray builds. Writes JSON (``--json``) and prints it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .cli import emit_report


def _load() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed_build(model: Any, options: Any) -> dict[str, Any]:
    """One build of ``options`` (a fresh output folder), its seconds and the load average around it."""
    from alignsearch.indexer.build import build

    shutil.rmtree(options.out, ignore_errors=True)
    before = _load()
    start = time.perf_counter()
    build(model, options)
    seconds = time.perf_counter() - start
    return {"images": len(options.files), "seconds": round(seconds, 2),
            "images_per_s": round(len(options.files) / seconds, 2), "load_before": before, "load_after": _load()}


def cpu_costs(model: Any, folder: Path, files: list[str], batch_size: int = 32) -> dict[str, float]:
    """CPU milliseconds per photo (process CPU time, one thread: less sensitive to a shared machine's load
    than wall time) of decoding + resizing, and of the encoder's forward pass on the resized pixels."""
    import torch

    from alignsearch.indexer.ray_engine import image_preprocessor

    pre, threads = image_preprocessor(model), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.process_time()
        pixels = np.stack([pre.load_file(folder / f)[0] for f in files])  # as the build reads them
        decode = time.process_time() - start
        start = time.process_time()
        for i in range(0, len(files), batch_size):
            model.encode_pixels(pre.normalize_tensor(pixels[i : i + batch_size]))
        encode = time.process_time() - start
    finally:
        torch.set_num_threads(threads)
    return {"photos": len(files), "decode_resize_cpu_ms": round(1000 * decode / len(files), 2),
            "encoder_cpu_ms_1_thread": round(1000 * encode / len(files), 2)}


def compare(model: Any, options: Any, small: int, ray_settings: Any) -> dict[str, Any]:
    """Local and Ray builds of ``options.files`` and of its first ``small`` files."""
    from alignsearch.indexer.ray_engine import RayDistributor

    def both(opts: Any) -> dict[str, Any]:
        timed_build(model, replace(opts, files=opts.files[:small]))  # warm-up: first worker start, page cache
        runs = {"small": timed_build(model, replace(opts, files=opts.files[:small])),
                "full": timed_build(model, opts)}
        extra = runs["full"]["seconds"] - runs["small"]["seconds"]
        runs["steady_images_per_s"] = round((len(opts.files) - small) / extra, 2) if extra > 0 else None
        return runs

    out = {"local": both(options)}
    start = time.perf_counter()
    with RayDistributor(model, ray_settings, options.batch_size) as distributor:
        out["ray_start_seconds"] = round(time.perf_counter() - start, 2)
        pool = distributor.pool()
        out["ray_pool"] = {"actors": pool["compute"].max_size, "encoder_threads": pool["fn_constructor_kwargs"]["threads"],
                           **{k: v for k, v in pool.items() if k in ("num_cpus", "num_gpus")}}
        out["ray"] = both(replace(options, distributor=distributor))
    return out


def main(argv: list[str] | None = None) -> int:
    from alignsearch.indexer.build import BuildOptions
    from alignsearch.indexer.ray_engine import RaySettings
    from alignsearch.indexer.reader import list_images
    from alignsearch.models import load_model

    p = argparse.ArgumentParser(prog="python -m alignsearch.bench.ray_build", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--limit", type=int, default=400, help="photos per full build")
    p.add_argument("--small", type=int, default=32, help="photos per small build (the fixed cost)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--encoder-threads", type=int, default=None, help="torch threads per Ray CPU actor")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--cpu-costs-only", action="store_true", help="only the CPU ms per photo (no builds)")
    args = p.parse_args(argv)
    import torch

    model = load_model(device="cpu")
    files = list_images(args.images)[: args.limit]
    result = {"command": "python -m alignsearch.bench.ray_build " + " ".join(argv or []), "cpus": os.cpu_count(),
              "cpu_costs": cpu_costs(model, args.images, files[: min(len(files), 200)], args.batch_size),
              "load_after_cpu_costs": _load()}
    if not args.cpu_costs_only:
        with tempfile.TemporaryDirectory(prefix="ray-build-bench-") as work:
            options = BuildOptions(images=args.images, out=Path(work) / "index", files=files, progress=False,
                                   batch_size=args.batch_size)
            settings = RaySettings(address=args.ray_address, encoder_threads=args.encoder_threads, progress=False)
            result.update(torch_threads_local=torch.get_num_threads(), **compare(model, options, args.small, settings))
    emit_report(result, args.json)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
