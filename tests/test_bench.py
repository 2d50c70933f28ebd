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
                "two_stage_e2e_ms", "rerank_gb_s", "memcpy_gb_s", "rerank_fraction_of_copy_bandwidth"):
        assert speed[key] > 0, key
    for codec in ("SQfp16", "SQ8"):
        q = results["quality"][codec]
        assert set(q["results"]) == {"global", "exhaustive", "two-stage"}
        assert q["bytes_per_image_local"] > 0
    assert results["quality"]["SQ8"]["bytes_per_image_local"] < results["quality"]["SQfp16"]["bytes_per_image_local"]
    assert results["build"]["build_images_per_s"] > 0 and results["build"]["forward_only_images_per_s"] > 0
    for label in ("batching_on", "batching_off"):
        s = results["serving"][label]
        assert s["errors"] == 0 and s["p99_ms"] >= s["p50_ms"] > 0
    assert len(results["targets"]) >= 8
    table = (tmp_path / "results-ci.md").read_text()
    assert "| target | measured | met |" in table and "SQ8" in table
