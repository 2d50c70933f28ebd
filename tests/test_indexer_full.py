"""The whole shared set through the CLI: 800 images and 4000 captions (about a minute on 2 CPU cores)."""

from __future__ import annotations

import json
import time

import pytest

from alignsearch.cli import main


@pytest.mark.slow
def test_build_the_shared_set(dataset_dir, tmp_path, capsys):
    out = tmp_path / "flickr8k-800"
    start = time.perf_counter()
    assert main(["index", "build", "--images", str(dataset_dir / "images"), "--captions",
                 str(dataset_dir / "captions.csv"), "--out", str(out), "--quiet"]) == 0
    seconds = time.perf_counter() - start
    report = json.loads(capsys.readouterr().out)
    assert report == {"images_indexed": 800, "captions_indexed": 4000, "skipped": 0}
    assert main(["index", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"] == {"images": 800, "captions": 4000, "images_deleted": 0, "captions_deleted": 0}
    assert info["images"]["faiss_type"] == info["captions"]["faiss_type"] == "IndexFlat"
    assert main(["index", "verify", str(out)]) == 0
    print(f"built 800 images + 4000 captions in {seconds:.1f} s")
