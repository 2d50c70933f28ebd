"""The build pipeline's ceiling: ``index build`` with its encoders replaced by an instant stand-in, against
decoding alone with the same worker count, on Flickr-sized (500 x 375) JPEGs, in one run.

    python -m alignsearch.bench.build_ceiling --quick            # ~1-2 minutes on 2 idle cores
    python -m alignsearch.bench.build_ceiling --photos 8000 --json bench/results/build-ceiling-cpu.json

- decode only: the build's own decode and resize (:meth:`ImagePreprocessor.load_file` through the decode
  processes' worker function) over every photo, in as many processes as the build starts, nothing sent back;
- build: :func:`indexer.build.build` of the same photos (images only) with :class:`InstantEncoders`: the
  default model whose ``encode_pixels`` / ``encode_texts`` return precomputed vectors of the real encoders'
  shapes and dtypes (no compute). Whatever else the build does (reading, decoding, resizing, batching, the
  copies between processes, shard writes, the stores, SQLite, the manifest) is in its time;
- ``ratio``: build photos/s / decode-only photos/s (target >= 0.85: the pipeline costs at most 15% of decoding);
  ``cpu_ratio``: decode-only CPU ms per photo (its processes') / the build's (its process and its decode
  processes'): what the pipeline adds to decoding's work, less sensitive than wall time to a shared machine;
- ``stages``: where the build's main process spends its time (cProfile of one more build, cumulative seconds of
  the build's own functions), so a serial step shows; ``main_cpu_s`` is that process's CPU time in the build.

Photos are generated (noise over gradients, quality 90, seeded) into a temp folder unless ``--images`` names a
folder. Each measurement runs after a warm-up (decode processes started, files in the page cache) and is
repeated (``--repeats``), the best kept; the load average is recorded around each.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .cli import emit_report

SIZE = (500, 375)  # Flickr's usual photo size


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_photos(folder: Path, n: int, size: tuple[int, int] = SIZE, seed: int = 0, distinct: int = 64) -> list[str]:
    """``n`` JPEGs of ``size`` (quality 90) in ``folder``: ``distinct`` seeded images (gradients and noise, which
    decode like a photo: no large flat areas) written in turn; returns their names, sorted."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    encoded = []
    for _ in range(min(distinct, n)):
        a, b, c = rng.uniform(0.2, 2.0, 3)
        base = np.stack([127 + 100 * np.sin(xx / (40 * a) + yy / (60 * b)),
                         127 + 100 * np.cos(yy / (50 * c) - xx / (70 * a)),
                         127 + 100 * np.sin((xx + yy) / (90 * b))], -1)
        noisy = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
        path = folder / "_tmp.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        encoded.append(path.read_bytes())
    (folder / "_tmp.jpg").unlink(missing_ok=True)
    names = [f"photo-{i:06d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(encoded[i % len(encoded)])
    return names


# -- the stand-in ---------------------------------------------------------------------------------------------

class InstantEncoders:
    """``model`` with its encoders replaced by an instant stand-in: ``encode_pixels`` and ``encode_texts``
    return rows of vectors made once (normalised, seeded) in the shapes and dtypes the real encoders give
    (measured on one input at start), with no compute; everything else (fingerprint, preprocessor, config) is
    the model's. Its ``device`` is torch's ``meta`` device (no data, no compute): the build treats it as an
    encoder off the CPU (a GPU's), decoding while it runs; ``on_cpu`` keeps the model's CPU device, so the build
    takes turns between decoding and encoding as it does for an encoder on the CPU. For benchmarks and tests
    only."""

    def __init__(self, model: Any, rows: int = 256, words: int = 16, on_cpu: bool = False) -> None:
        import torch

        from alignsearch.models.model import EncoderOutput

        self._model, self._output = model, EncoderOutput
        pre = model.image_preprocessor
        probe = model.encode_pixels(pre.normalize_tensor(np.zeros((1, pre.size, pre.size, 3), np.uint8)))
        g = torch.Generator().manual_seed(0)

        def normal(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
            x = torch.randn(shape, generator=g)
            return (x / x.norm(dim=-1, keepdim=True)).to(like.dtype)

        self._image = (normal((rows, probe.global_emb.shape[1]), probe.global_emb),
                       normal((rows,) + tuple(probe.local.shape[1:]), probe.local),
                       probe.mask[:1].expand(rows, -1).clone())
        text = model.encode_texts(["a photo"])
        self._text = (normal((rows, text.global_emb.shape[1]), text.global_emb),
                      normal((rows, words, text.local.shape[2]), text.local), torch.ones(rows, words, dtype=torch.bool))
        self.regions = int(probe.mask.shape[1])
        self.device = model.device if on_cpu else torch.device("meta")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def _rows(self, bank: tuple, n: int) -> Any:
        out, first = [], 0
        while first < n:  # batches larger than the bank take it in turn
            take = min(n - first, len(bank[0]))
            out.append(self._output(*(t[:take] for t in bank)))
            first += take
        return out[0] if len(out) == 1 else self._output.concat(out)

    def encode_pixels(self, pixel_values: Any) -> Any:
        return self._rows(self._image, len(pixel_values))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> Any:
        out = self._rows(self._text, len(texts))
        out.words, out.truncated = [["a"] * out.local.shape[1] for _ in texts], [False] * len(texts)
        return out


# -- decode only ----------------------------------------------------------------------------------------------

def _decode_chunk(folder: str, names: list[str]) -> int:
    """Runs in a decode process (started with the build's initializer): the build's worker function on each
    file, the result dropped; returns how many decoded."""
    from alignsearch.indexer.reader import _decode_resized

    return sum(_decode_resized(Path(folder), name).error is None for name in names)


def decode_only(folder: Path, names: list[str], workers: int, preprocessor: Any) -> dict[str, Any]:
    """Photos/s of the build's decode and resize over ``names`` in ``workers`` processes started as the
    build's are (same initializer, priority), each taking its share in chunks; nothing but a count is sent back.
    A warm-up chunk per process first (its start excluded)."""
    import multiprocessing

    from alignsearch.indexer.reader import WORKER_NICE, _start_worker

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(preprocessor, WORKER_NICE, os.getpid())) as pool:
        list(pool.map(_decode_chunk, [str(folder)] * workers, [names[:8]] * workers))
        chunk = max(1, min(64, len(names) // (workers * 8)))
        chunks = [names[i : i + chunk] for i in range(0, len(names), chunk)]
        pids = _pool_pids(pool)
        before, cpu, start = _load(), _processes_cpu_s(pids), time.perf_counter()
        decoded = sum(pool.map(_decode_chunk, [str(folder)] * len(chunks), chunks))
        seconds = time.perf_counter() - start
        cpu = _processes_cpu_s(pids) - cpu
    return {"photos": len(names), "decoded": decoded, "seconds": round(seconds, 3),
            "photos_per_s": round(len(names) / seconds, 1), "workers_cpu_s": round(cpu, 3),
            "cpu_ms_per_photo": round(1000 * cpu / len(names), 3), "load_before": before, "load_after": _load()}


# -- the build ------------------------------------------------------------------------------------------------

def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _processes_cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) used so far by the processes ``pids`` (Linux ``/proc``; 0 elsewhere)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _pool_pids(executor: Any) -> list[int]:
    return list(getattr(executor, "_processes", None) or {})


def timed_build(model: Any, options: Any, pool: Any = None) -> dict[str, Any]:
    """One build of ``options`` (a fresh output folder): wall seconds, and CPU seconds of this process and of
    ``pool``'s decode processes (started already)."""
    from alignsearch.indexer.build import build

    shutil.rmtree(options.out, ignore_errors=True)
    pids = _pool_pids(getattr(pool, "_executor", None))
    before, cpu, workers_cpu, start = _load(), _cpu_s(), _processes_cpu_s(pids), time.perf_counter()
    build(model, options)
    seconds = time.perf_counter() - start
    cpu, workers_cpu, n = _cpu_s() - cpu, _processes_cpu_s(pids) - workers_cpu, len(options.files)
    return {"photos": n, "seconds": round(seconds, 3), "photos_per_s": round(n / seconds, 1),
            "main_cpu_s": round(cpu, 3), "workers_cpu_s": round(workers_cpu, 3),
            "cpu_ms_per_photo": round(1000 * (cpu + workers_cpu) / n, 3),
            "main_cpu_ms_per_photo": round(1000 * cpu / n, 3), "load_before": before, "load_after": _load()}


STAGE_PREFIXES = ("indexer/", "models/preprocess", "models/model", "bench/build_ceiling", "concurrent/futures",
                  "multiprocessing/", "sqlite3", "numpy/lib/format", "json/", "shutil", "pathlib")


def profiled_build(model: Any, options: Any, top: int = 25) -> dict[str, Any]:
    """One build under cProfile: the functions with the most cumulative time (the build's own and the library
    calls it makes), seconds and calls, so the serial steps show."""
    from alignsearch.indexer.build import build

    shutil.rmtree(options.out, ignore_errors=True)
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.runcall(build, model, options)
    seconds = time.perf_counter() - start
    stats = pstats.Stats(profile)
    rows = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{_short(filename)}:{line}({name})", "calls": calls,
                     "cumulative_s": round(cumulative, 3), "own_s": round(own, 3)})
    by_cumulative = sorted(rows, key=lambda r: -r["cumulative_s"])[:top]
    by_own = sorted(rows, key=lambda r: -r["own_s"])[:top]
    return {"seconds": round(seconds, 3), "by_cumulative": by_cumulative, "by_own_time": by_own}


def _short(filename: str) -> str:
    for marker in ("/alignsearch/", "/site-packages/", "/lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    parts = Path(filename).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else filename


def run(images: Path | None, photos: int, workers: int, batch_size: int, repeats: int, profile: bool,
        work: Path, on_cpu: bool = False) -> dict[str, Any]:
    import torch

    from alignsearch.indexer.build import BuildOptions
    from alignsearch.indexer.encode import decode_pool
    from alignsearch.indexer.reader import list_images
    from alignsearch.models import load_model

    if images is None:
        images = work / "photos"
        start = time.perf_counter()
        names = make_photos(images, photos)
        made = round(time.perf_counter() - start, 2)
    else:
        names, made = list_images(images)[:photos], None
    model = InstantEncoders(load_model(device="cpu"), on_cpu=on_cpu)
    pool = decode_pool(model, workers)
    options = BuildOptions(images=images, out=work / "index", files=names, progress=False, batch_size=batch_size,
                           workers=workers)
    from dataclasses import replace

    timed_build(model, replace(options, files=names[: min(len(names), 4 * batch_size)]))  # decode processes start
    for name in names:  # page cache
        (images / name).read_bytes()
    result: dict[str, Any] = {
        "photos": len(names), "photo_size": list(SIZE) if made is not None else "as found",
        "images": "generated" if made is not None else str(images), "workers_asked": workers,
        "decode_processes": pool.workers, "batch_size": batch_size, "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "encoder": "instant, on the CPU: decoders and encoder take turns" if on_cpu else
                   "instant, off the CPU: decoding runs while it encodes", "regions": model.regions,
        "embed_dim": int(model.embed_dim), "load_start": _load(), "runs": []}
    for _ in range(repeats):  # interleaved, so a change of load hits both
        decode = decode_only(images, names, pool.workers, model.image_preprocessor)
        built = timed_build(model, options, pool)
        result["runs"].append({"decode_only": decode, "build": built,
                               "ratio": round(built["photos_per_s"] / decode["photos_per_s"], 3),
                               "cpu_ratio": round(decode["cpu_ms_per_photo"] / built["cpu_ms_per_photo"], 3)})
    best_decode = max(r["decode_only"]["photos_per_s"] for r in result["runs"])
    best_build = max(r["build"]["photos_per_s"] for r in result["runs"])
    result.update(decode_only_photos_per_s=best_decode, build_photos_per_s=best_build,
                  ratio_best=round(best_build / best_decode, 3),
                  ratio_median=float(np.median([r["ratio"] for r in result["runs"]])),
                  cpu_ratio_median=float(np.median([r["cpu_ratio"] for r in result["runs"]])), target=0.85)
    if profile:
        result["profile"] = profiled_build(model, options)
    result["load_end"] = _load()
    shutil.rmtree(options.out, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m alignsearch.bench.build_ceiling", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=Path, default=None, help="a folder of photos (default: generated 500x375 JPEGs)")
    p.add_argument("--photos", type=int, default=8000, help="photos per build (default 8000; --quick: 3000)")
    p.add_argument("--workers", type=int, default=4, help="decode workers asked for (the build's default: 4)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="decode-only and build runs, interleaved (--quick: 2)")
    p.add_argument("--quick", action="store_true", help="3000 photos, 2 repeats: about a minute on 2 idle cores")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled build")
    p.add_argument("--turns", action="store_true",
                   help="the stand-in on the CPU device: the build takes turns between decoding and encoding, as "
                        "with a CPU encoder (default: an encoder off the CPU, decoding runs beside it)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    if args.quick:
        args.photos = min(args.photos, 3000) if "--photos" in (argv or []) else 3000
        args.repeats = 2
    from alignsearch.indexer.allocator import keep_freed_memory

    keep_freed_memory()  # as the CLI's index build does
    with tempfile.TemporaryDirectory(prefix="build-ceiling-", dir=args.work) as work:
        result = {"command": "python -m alignsearch.bench.build_ceiling " + " ".join(argv or []),
                  **run(args.images, args.photos, args.workers, args.batch_size, args.repeats, not args.no_profile,
                        Path(work), args.turns)}
    emit_report(result, args.json)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
