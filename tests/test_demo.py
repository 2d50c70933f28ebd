"""`alignsearch demo --no-serve`: indexes the sample photos that ship with scikit-image, offline, with our captions."""

from __future__ import annotations

import json
import shutil

import pytest

from alignsearch.cli import main
from alignsearch.service.demo import DEMO_CAPTIONS, SAMPLE_PHOTOS


def _info(capsys) -> dict:
    lines = capsys.readouterr().out.splitlines()
    return json.loads("\n".join(lines[lines.index("{"):]))  # `index info` prints one JSON object


def test_demo_captions_name_sample_photos():
    rows = [json.loads(line) for line in DEMO_CAPTIONS.read_text().splitlines() if line.strip()]
    assert {r["image"] for r in rows if "image" in r} == set(SAMPLE_PHOTOS)  # every photo captioned, no strays
    assert all(r["caption"].strip() for r in rows)


def test_demo_indexes_the_sample_photos(tmp_path, capsys):
    pytest.importorskip("skimage", reason="the demo photos come with scikit-image (pip install 'alignsearch[demo]')")
    argv = ["demo", "--no-serve", "--out", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 0
    assert main(["index", "info", str(tmp_path / "index")]) == 0
    info = _info(capsys)
    n_captions = sum(1 for line in DEMO_CAPTIONS.read_text().splitlines() if line.strip())
    assert info["counts"]["images"] == len(SAMPLE_PHOTOS) == len(list((tmp_path / "photos").iterdir()))
    assert info["counts"]["captions"] == n_captions

    assert main(argv) == 0  # a second run reuses the index instead of building it again
    assert "using the demo index" in capsys.readouterr().out

    from alignsearch.indexer.search import Searcher

    searcher = Searcher.open(tmp_path / "index", device="cpu")
    hits = searcher.search_text(["a red motorcycle"], k=3, candidates=len(SAMPLE_PHOTOS))[0].hits
    assert any(h.id.startswith("motorcycle") for h in hits)


@pytest.mark.slow
def test_demo_on_your_own_folder_finds_its_captions(tmp_path, capsys, photos):
    images, captions = photos
    mine = tmp_path / "my photos"
    shutil.copytree(images, mine)
    shutil.copy(captions, mine / "captions.csv")  # found in the folder without --captions
    assert main(["demo", "--no-serve", "--images", str(mine), "--out", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "captions.csv" in out and "indexed 16 images" in out
    (index_dir,) = (tmp_path / "cache").glob("index-my photos-*/")
    assert main(["index", "info", str(index_dir)]) == 0
    assert _info(capsys)["counts"]["images"] == 16
