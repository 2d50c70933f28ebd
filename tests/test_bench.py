"""The benchmark suite's quick mode runs end to end and writes well-formed results (no timing thresholds)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_bench_writes_every_figure(tmp_path, dataset_dir):
    run = subprocess.run([sys.executable, "-m", "alignsearch.bench", "--quick", "--out", str(tmp_path), "--dataset", str(dataset_dir),
                          "--tag", "ci"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "results-ci.json").read_text())
    speed = next(iter(results["speed"].values()))
    for key in ("two_stage_search_ms", "exhaustive_search_ms", "speedup_two_stage_vs_exhaustive", "global_only_e2e_ms",
                "two_stage_e2e_ms"):
        assert speed[key] > 0, key
    assert speed["cold"]["two_stage_search_ms"] > 0 and "DONTNEED" in speed["cold"]["how"]
    assert len(speed["load_before"]) == len(speed["load_after"]) == 3
    default = speed["rerank"]["16"]["dtype"]  # the kernel the searcher chose: float32, float16 or bfloat16
    assert {"1", "16"} | {f"16-{d}" for d in ("float32", "float16", "bfloat16") if d != default} <= set(speed["rerank"])
    for rerank in speed["rerank"].values():
        assert rerank["rerank_bytes"] > 0 and rerank["rerank_gb_s"] > 0 and rerank["fraction_of_copy_bandwidth"] > 0
    assert speed["rerank"]["16"]["rerank_bytes"] > speed["rerank"]["1"]["rerank_bytes"]  # the union of 16 lists
    for codec in ("SQfp16", "SQ8"):
        q = results["quality"][codec]
        assert set(q["results"]) == {"global", "exhaustive", "two-stage"}
        assert q["bytes_per_image_local"] > 0
    assert results["quality"]["SQ8"]["bytes_per_image_local"] < results["quality"]["SQfp16"]["bytes_per_image_local"]
    assert results["build"]["build_images_per_s"] > 0 and results["build"]["forward_only_images_per_s"] > 0
    assert set(results["build"]["load"]) == {"forward_before", "forward_after", "build_before", "build_after"}
    phone = results["build_phone_photos"]
    assert phone["images"] == 8 and phone["photo_pixels"] == "4032x3024" and phone["build_images_per_s"] > 0
    assert phone["decode_cpu_ms_per_photo_full"] > 0 and phone["decode_cpu_ms_per_photo_build"] > 0
    for label in ("batching_on", "batching_off"):
        s = results["serving"][label]
        assert s["errors"] == 0 and s["p99_ms"] >= s["p50_ms"] > 0
        assert len(s["load_before_after"]) == 2
    assert len(results["targets"]) >= 8
    assert "cold two-stage search ms" in (tmp_path / "results-ci.md").read_text()
    table = (tmp_path / "results-ci.md").read_text()
    assert "| target | measured | met |" in table and "SQ8" in table


@pytest.mark.slow
def test_million_mode_at_a_small_size(tmp_path):
    """``--million`` end to end at 3,000 images: compact codes, the chosen global index, cold and warm percentiles, RSS."""
    run = subprocess.run([sys.executable, "-m", "alignsearch.bench", "--million", "--sizes", "3000", "--latency-queries", "12",
                          "--out", str(tmp_path), "--work", str(tmp_path / "work"), "--tag", "m"],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads((tmp_path / "results-m.json").read_text())["speed"]["3000"]
    assert row["codec"] == "compact" and row["global_factory"] == "Flat"  # what a real build of 3,000 chooses
    assert row["index_bytes"]["images/codes.npy"] == 3000 * 49 * 64 + 128  # PQ64: 64 bytes per region (+ header)
    for state in ("latency_cold", "latency_warm"):
        for kind in ("two_stage", "global_only"):
            p = row[state][kind]
            assert p["count"] == 12 and p["p99_ms"] >= p["p50_ms"] > 0
    assert row["server"]["vmrss"] > row["server"]["rssanon"] > 0
    assert row["server"]["cold_start_ready_s"] > 0 and row["server"]["first_request_ms"] > 0
    assert row["server"]["other_requests_p50_ms"] > 0
