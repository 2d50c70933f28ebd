"""``alignsearch bench`` / ``python -m alignsearch.bench``: run the suite, write JSON and a markdown table."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from alignsearch.models.cli import add_progress_option, apply_progress_option

SHARED_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flickr8k-800"
DEFAULT_DATASET = Path(os.environ.get("ALIGNSEARCH_DATASET", SHARED_DATASET))


def emit_report(report: dict[str, Any], json_path: Path | None = None) -> None:
    """Print ``report`` as indented JSON and, with ``json_path``, write the same text there (its folder made)."""
    text = json.dumps(report, indent=2)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    print(text)


def model_report_main(argv: list[str] | None, prog: str, usage_note: str,
                      run_report: Callable[[str | None], dict[str, Any]]) -> int:
    """A ``python -m alignsearch.bench.PROG [MODEL]`` entry: ``run_report(model or None)`` printed as JSON; bad
    arguments and errors (no such model, data or package) in one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print(f"usage: python -m alignsearch.bench.{prog} [MODEL]  ({usage_note})", file=sys.stderr)
        return 2
    try:
        report = run_report(argv[0] if argv else None)
    except (OSError, ValueError, ImportError) as exc:
        print(f"bench.{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


PARTS = ("speed", "quality", "build", "serving")
DESCRIPTION = ("Measure the design's claims (two-stage speed against exhaustive and global-only search, rerank "
               "bandwidth, codecs and quality, build throughput, serving with batching on and off) and write "
               "results-TAG.json and .md.")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the two-stage design (JSON + markdown out)", description=DESCRIPTION)
    _arguments(p)
    p.set_defaults(func=run)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes: checks that every benchmark runs (CI)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for results JSON and table")
    p.add_argument("--dataset", type=Path, default=None,
                   help="flickr8k-800 folder (dataset_flickr8k.json + images/) for quality, codecs and build "
                        f"(default: $ALIGNSEARCH_DATASET, else {SHARED_DATASET}; skipped if absent)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder for synthetic indexes (default: temp)")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="synthetic collection sizes (default: 1000 with --quick, else 10000 100000)")
    p.add_argument("--million", action="store_true",
                   help="the large run only (not CI): a synthetic index of 1,000,000 images (or --sizes) with the "
                        "--million-codec local codes and the global index a real build of that size would choose; "
                        "index size per store, p50/p99 search latency cold and warm, server RSS (at 1M with compact "
                        "codes: ~6 GB of disk, about 15 minutes on 2 idle cores)")
    p.add_argument("--million-codec", default="compact",
                   help="local codec of the --million index (default: compact, 3.1 kB per photo; SQ8 is 18.8 kB)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                   help="which benchmarks to run (default: all; targets are judged on what ran)")
    p.add_argument("--latency-queries", type=int, default=200, help="queries for p50/p99 in the --million run")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--tag", default=None, help="name of the results file (default: cpu or gpu)")
    add_progress_option(p)


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Each target of the design, with the measured figure and whether it is met."""
    out: dict[str, Any] = {}
    speed = results.get("speed", {})
    if speed:
        label = max(speed, key=int)
        largest = speed[label]
        if largest["speedup_two_stage_vs_exhaustive"] is not None:
            out["two_stage_vs_exhaustive >= 50x at largest N"] = [largest["speedup_two_stage_vs_exhaustive"],
                                                                  largest["speedup_two_stage_vs_exhaustive"] >= 50]
        out[f"two_stage_e2e <= 1.5x global-only at {label}"] = [largest["two_stage_over_global_only"],
                                                                largest["two_stage_over_global_only"] <= 1.5]
        batch = max(largest["rerank"], key=lambda b: int(b) if b.isdigit() else 0)  # the micro-batch, default dtype
        fraction = largest["rerank"][batch]["fraction_of_copy_bandwidth"]
        out[f"rerank (batch of {batch}) >= 25% of copy bandwidth"] = [fraction, fraction >= 0.25]
    quality = results.get("quality", {})
    if "SQfp16" in quality:
        r = quality["SQfp16"]["results"]
        gap = round(r["exhaustive"]["rsum"] - r["two-stage"]["rsum"], 2)
        out["two-stage within 1 rsum of exhaustive"] = [gap, gap <= 1.0]
        out["two-stage above global-only"] = [r["two-stage"]["rsum"] - r["global"]["rsum"],
                                              r["two-stage"]["rsum"] > r["global"]["rsum"]]
        if "SQ8" in quality:
            d = round(r["two-stage"]["rsum"] - quality["SQ8"]["results"]["two-stage"]["rsum"], 2)
            out["SQ8 within 1 rsum of SQfp16"] = [d, d <= 1.0]
        small = [c for c, q in quality.items() if q["bytes_per_image_local"] <= 4096
                 and r["two-stage"]["rsum"] - q["results"]["two-stage"]["rsum"] <= 1.0]
        out["<= 4 kB per photo within 1 rsum of SQfp16"] = [
            min(small, key=lambda c: quality[c]["bytes_per_image_local"]) if small else None, bool(small)]
        within2 = [c for c, q in quality.items() if r["two-stage"]["rsum"] - q["results"]["two-stage"]["rsum"] <= 2.0]
        out["smallest codec within 2 rsum"] = [min(within2, key=lambda c: quality[c]["bytes_per_image_local"]), True]
    build = results.get("build")
    if build:
        out["build >= 85% of forward-only"] = [build["build_fraction_of_forward"], build["build_fraction_of_forward"] >= 0.85]
    serve = results.get("serving")
    if serve:
        errors = serve["batching_on"]["errors"] + serve["batching_off"]["errors"]
        out["batching on >= 2x off, zero errors"] = [serve["throughput_on_over_off"],
                                                     serve["throughput_on_over_off"] >= 2 and errors == 0]
    return out


def _build_sentence(b: dict[str, Any]) -> str:
    """A :func:`suite.build_throughput` result in words."""
    return (f"{b['images']} images in {b['build_seconds']} s = {b['build_images_per_s']} img/s; encoder forward only "
            f"{b['forward_only_images_per_s']} img/s (all forward-only timings, one before and one after each build: "
            f"{b['forward_only_images_per_s_before_after']}); ratio {b['build_fraction_of_forward']} (median of "
            f"{b.get('rounds', 1)} rounds: {b.get('build_fraction_of_forward_each_round')})")


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Benchmark results ({results['environment']['device']}, {'quick' if results['quick'] else 'full'})", "",
             f"Command: `{results['command']}`", ""]
    if results.get("speed"):
        lines += ["| N images | codec | global | cold two-stage search ms | two-stage search ms | exhaustive ms | speed-up | "
                  "global-only e2e ms | two-stage e2e ms | ratio | load before / after |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for n, r in results["speed"].items():
            lines.append(f"| {n} | {r['codec']} | {r['global_factory']} | {r['cold']['two_stage_search_ms']} | "
                         f"{r['two_stage_search_ms']} | {r['exhaustive_search_ms']} | {r['speedup_two_stage_vs_exhaustive']}x | "
                         f"{r['global_only_e2e_ms']} | {r['two_stage_e2e_ms']} | {r['two_stage_over_global_only']} | "
                         f"{r['load_before'][0]} / {r['load_after'][0]} |")
        lines += ["", "| N images | rerank queries | dtype | union bytes | rerank ms | rerank GB/s | memcpy GB/s | fraction |",
                  "|---|---|---|---|---|---|---|---|"]
        for n, r in results["speed"].items():
            for b in r["rerank"].values():
                lines.append(f"| {n} | {b['queries']} | {b['dtype']} | {b['rerank_bytes']} | {b['rerank_ms']} | "
                             f"{b['rerank_gb_s']} | {b['memcpy_gb_s']} | {b['fraction_of_copy_bandwidth']} |")
        lines.append("")
        for n, r in results["speed"].items():
            if "latency_warm" in r:
                c, w = r["latency_cold"], r["latency_warm"]
                lines += [f"At {n}: index bytes {r['index_bytes']}; search latency over {w['two_stage']['count']} queries, "
                          f"two-stage p50/p99 cold {c['two_stage']['p50_ms']} / {c['two_stage']['p99_ms']} ms, warm "
                          f"{w['two_stage']['p50_ms']} / {w['two_stage']['p99_ms']} ms; global-only warm "
                          f"{w['global_only']['p50_ms']} / {w['global_only']['p99_ms']} ms (two-stage / global-only p50 "
                          f"{w['two_stage_over_global_only_p50']}); cold = {c['how']}."
                          + (f" Server RSS {r['server'].get('vmrss', 0) / 1e9:.2f} GB (anonymous "
                             f"{r['server'].get('rssanon', 0) / 1e9:.2f} GB, file {r['server'].get('rssfile', 0) / 1e9:.2f} GB); "
                             f"ready {r['server'].get('cold_start_ready_s')} s after its start on a cold cache, first "
                             f"request {r['server'].get('first_request_ms')} ms, the others' p50 "
                             f"{r['server'].get('other_requests_p50_ms')} ms (HTTP, text queries encoded)."
                             if "server" in r else ""), ""]
    if results.get("quality"):
        lines += ["| codec | bytes/image | bytes/caption | global rsum | exhaustive rsum | two-stage rsum | two-stage R@1 i2t / t2i | gather + decode of 20 photos ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for codec, q in results["quality"].items():
            r = q["results"]
            lines.append(f"| {codec} | {q['bytes_per_image_local']} | {q['bytes_per_caption_local']} | {r['global']['rsum']} | "
                         f"{r['exhaustive']['rsum']} | {r['two-stage']['rsum']} | {r['two-stage']['i2t_r1']} / {r['two-stage']['t2i_r1']} | "
                         f"{q.get('gather_ms', '')} |")
        lines.append("")
    if results.get("build"):
        b = results["build"]
        lines += [f"Build: {_build_sentence(b)}; load average (1 min) before / after the builds "
                  f"{b['load']['build_before'][0]} / {b['load']['build_after'][0]}.", ""]
    if results.get("build_phone_photos"):
        b = results["build_phone_photos"]
        lines += [f"Build on phone-size photos ({b['photo_pixels']}, {b['megabytes_per_photo']} MB each; decode and "
                  f"resize {b['decode_cpu_ms_per_photo_full']} CPU ms per photo at full size, "
                  f"{b['decode_cpu_ms_per_photo_build']} at the build's reduced JPEG scale): {_build_sentence(b)}.", ""]
    if results.get("serving"):
        lines += ["| serving | requests | errors | throughput req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
        for label in ("batching_on", "batching_off"):
            s = results["serving"][label]
            lines.append(f"| {label} | {s['requests']} | {s['errors']} | {s['throughput_rps']} | {s['p50_ms']} | {s['p99_ms']} |")
        lines.append("")
    lines += ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else 'no'} |" for name, (value, ok) in results["targets"].items()]
    return "\n".join(lines) + "\n"


def _dataset(args: argparse.Namespace) -> Path | None:
    """The data set to measure quality on: ``--dataset`` must be one; the default may be absent (then skipped)."""
    folder = args.dataset or DEFAULT_DATASET
    if (folder / "dataset_flickr8k.json").is_file() and (folder / "images").is_dir():
        return folder
    if args.dataset is not None:
        raise FileNotFoundError(f"--dataset {args.dataset}: not a flickr8k-800 folder (it needs "
                                "dataset_flickr8k.json and images/)")
    print(f"no data set at {folder}: quality, codecs and build are skipped (pass --dataset)", flush=True)
    return None


def run(args: argparse.Namespace) -> int:
    dataset = _dataset(args)  # before the model loads
    from alignsearch.models.factory import load_model

    from . import suite
    from .synthetic import write_synthetic_index

    apply_progress_option(args)
    model = load_model(device=args.device)
    if args.million:
        return _run_million(args, model)
    quick = args.quick
    sizes = args.sizes or ([1_000] if quick else [10_000, 100_000])
    results: dict[str, Any] = {"quick": quick, "command": args.command_line,
                               "environment": suite.environment(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="alignsearch-bench-") as tmp:
        work = args.work or Path(tmp)
        if "speed" in args.parts:
            print(f"speed on synthetic indexes of {sizes} images ...", flush=True)
            results["speed"] = suite.speed_vs_exhaustive_and_global(model, sizes, work, repeats=3 if quick else 21)
        if dataset is not None:
            if "quality" in args.parts:
                print("quality and codecs on the test split ...", flush=True)
                codecs = ["SQfp16", "SQ8", "compact"] if quick else ["SQfp16", "SQ8", "PQ96", "PQ48", "compact"]
                results["quality"] = suite.quality_and_codecs(model, dataset, codecs, limit=8 if quick else None)
            if "build" in args.parts:
                print("build throughput ...", flush=True)
                results["build"] = suite.build_throughput(model, dataset / "images", 16 if quick else None, work,
                                                          rounds=1 if quick else 3)
                if model.image_preprocessor is not None:
                    print("build throughput on phone-size photos ...", flush=True)
                    results["build_phone_photos"] = suite.phone_photo_build(
                        model, dataset / "images", 8 if quick else 128, work, rounds=1 if quick else 3)
        else:
            results["skipped"] = f"no data set at {args.dataset or DEFAULT_DATASET}: quality, codecs and build not measured"
        if "serving" in args.parts:
            print("serving under concurrency ...", flush=True)
            synthetic = write_synthetic_index(work / f"synthetic-{sizes[0]}", model, sizes[0])
            results["serving"] = suite.serving(synthetic, 32 if quick else 480)
    results["targets"] = targets(results)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("gpu" if "CPU" not in results["environment"]["device"] else "cpu") + ("-quick" if quick else "")
    (args.out / f"results-{tag}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"results-{tag}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def _run_million(args: argparse.Namespace, model: Any) -> int:
    """``--million``: the speed benchmarks at 1M (or ``--sizes``) with ``--million-codec`` and a chosen global index."""
    from . import suite

    sizes = args.sizes or [1_000_000]
    results: dict[str, Any] = {"quick": False, "million": True, "command": args.command_line,
                               "environment": suite.environment(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="alignsearch-bench-") as tmp:
        work = args.work or Path(tmp)
        print(f"speed on synthetic {args.million_codec} indexes of {sizes} images (global index chosen for the size)"
              " ...", flush=True)
        results["speed"] = suite.speed_vs_exhaustive_and_global(
            model, sizes, work, repeats=21, codec=args.million_codec, global_spec=None, latency_queries=args.latency_queries,
            server=True)
    results["targets"] = targets(results)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("gpu" if "CPU" not in results["environment"]["device"] else "cpu") + "-million"
    (args.out / f"results-{tag}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"results-{tag}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m alignsearch.bench``: the same as ``alignsearch bench``, with the same help and error handling."""
    from alignsearch.console import HelpFormatter, one_line_errors, run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m alignsearch.bench", description=DESCRIPTION, formatter_class=HelpFormatter)
    _arguments(parser)
    one_line_errors(parser)
    parser.set_defaults(func=run)
    args = parser.parse_args(argv)
    args.command, args.command_line = "bench", shlex.join(["python", "-m", "alignsearch.bench", *argv])
    return run_command(args)
