"""Photos' fields: what the build reads itself (folder, mtime, EXIF date, size), the captions file's extra
columns and a --metadata file, typed in SQLite; `index info` lists them; `index add` adds and updates them;
an index written before fields existed still opens."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from conftest import sample_files
from alignsearch.cli import main
from alignsearch.indexer import layout, photo_fields
from alignsearch.indexer.index import Index, verify
from alignsearch.indexer.search import Searcher
from alignsearch.models import load_model


@pytest.fixture(scope="module")
def model():
    return load_model(device="cpu")


def _exif_jpeg(path: Path, source: Path, taken: str) -> None:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = taken  # DateTimeOriginal
    Image.open(source).convert("RGB").save(path, format="JPEG", exif=exif)


@pytest.fixture(scope="module")
def small(tmp_path_factory, photos) -> tuple[Path, Path, Path]:
    """Four photos (two in a/b/, one with an EXIF capture date), captions with a 'source' column, a metadata file."""
    root = tmp_path_factory.mktemp("fields")
    images = root / "images"
    (images / "a" / "b").mkdir(parents=True)
    files = sample_files(photos[0])[:4]
    shutil.copy(files[0], images / "one.png" if files[0].suffix == ".png" else images / f"one{files[0].suffix}")
    _exif_jpeg(images / "a" / "b" / "two.jpg", files[1], "2019:07:04 12:30:00")
    shutil.copy(files[2], images / "a" / "b" / f"three{files[2].suffix}")
    shutil.copy(files[3], images / "a" / f"four{files[3].suffix}")
    captions = root / "captions.csv"
    with open(captions, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption", "source", "rating"])
        w.writerow(["a/b/two.jpg", "a photo", "camera", "4"])
        w.writerow(["a/b/two.jpg", "the same photo", "scan", "4"])
        w.writerow([f"a/four{files[3].suffix}", "another photo", "camera", "2.5"])
    meta = root / "meta.jsonl"
    meta.write_text("\n".join(json.dumps(r) for r in [
        {"image": "a/b/two.jpg", "album": "holidays", "tags": ["beach", "sun"], "shot": "2020-05-01", "public": True},
        {"image": f"a/four{files[3].suffix}", "album": "work", "tags": ["office"], "shot": "2021-01-02T08:00:00Z",
         "public": False},
        {"image": "not-indexed.jpg", "album": "nowhere"},
    ]) + "\n")
    return images, captions, meta


@pytest.fixture(scope="module")
def index_dir(small, tmp_path_factory) -> Path:
    images, captions, meta = small
    out = tmp_path_factory.mktemp("fields-idx") / "index"
    assert main(["index", "build", "--images", str(images), "--captions", str(captions), "--metadata", str(meta),
                 "--out", str(out), "--quiet"]) == 0
    return out


def test_fields_are_read_typed_and_listed_by_index_info(index_dir, capsys):
    assert main(["index", "info", str(index_dir)]) == 0
    fields = json.loads(capsys.readouterr().out)["fields"]
    assert {k: v["type"] for k, v in fields.items()} == {
        "folder": "string", "mtime": "date", "taken": "date", "width": "number", "height": "number",
        "source": "string", "rating": "number", "album": "string", "tags": "string", "shot": "date",
        "public": "bool"}
    assert fields["folder"]["photos"] == 4 and fields["taken"]["photos"] == 1 and fields["album"]["photos"] == 2
    assert verify(index_dir) == []


def test_hits_show_their_fields_typed(index_dir, model):
    searcher = Searcher(Index(index_dir), model)
    hits = {h.id: h.metadata for h in searcher.search_text(["a photo"], k=4, candidates=4)[0].hits}
    two = hits["a/b/two.jpg"]
    assert two["folder"] == "a/b" and two["taken"] == "2019-07-04T12:30:00Z"
    assert sorted(two["source"]) == ["camera", "scan"] and two["rating"] == 4  # two captions, two sources
    assert two["tags"] == ["beach", "sun"] and two["shot"] == "2020-05-01T00:00:00Z" and two["public"] is True
    assert isinstance(two["width"], int) and two["mtime"].endswith("Z")
    one = next(m for i, m in hits.items() if i.startswith("one"))
    assert one["folder"] == "" and "album" not in one and "taken" not in one
    conn = sqlite3.connect(index_dir / layout.METADATA)
    kinds = {r[0]: r[1] for r in conn.execute("SELECT f.field, typeof(f.value) FROM image_fields f")}
    assert kinds["rating"] == "real" and kinds["shot"] == "real" and kinds["public"] == "integer"
    assert kinds["album"] == "text"
    assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'image_fields_by_value'").fetchone()[0] == 1


def test_a_bad_metadata_file_fails_before_encoding_in_one_line(small, tmp_path, capsys):
    images, captions, _ = small
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a/b/two.jpg", "width": "wide"}\n')
    assert main(["index", "build", "--images", str(images), "--metadata", str(bad), "--out", str(tmp_path / "x"),
                 "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "'width' is a number field" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    bad.write_text("not json\n")
    assert main(["index", "build", "--images", str(images), "--metadata", str(bad), "--out", str(tmp_path / "x"),
                 "--quiet"]) != 0
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_add_types_new_values_by_the_index_and_updates_indexed_photos(index_dir, small, tmp_path, capsys, model):
    images, _, _ = small
    work = tmp_path / "index"
    shutil.copytree(index_dir, work)
    more = tmp_path / "more"
    (more / "c").mkdir(parents=True)
    new = more / "c" / "five.png"
    Image.new("RGB", (40, 30), "blue").save(new)
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"image": "c/five.png", "rating": "3", "album": "new"}) + "\n"
                    + json.dumps({"image": "a/b/two.jpg", "album": ["x", "y"], "tags": []}) + "\n")
    assert main(["index", "add", str(work), "--images", str(more), "--metadata", str(meta), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images_added"] == 1 and report["metadata_updated"] == 1
    index = Index(work)
    rows = {r["id"]: r["row"] for r in index.conn.execute("SELECT id, row FROM images")}
    shown = index.fields_of(list(rows.values()))
    assert shown[rows["c/five.png"]]["rating"] == 3 and shown[rows["c/five.png"]]["folder"] == "c"
    assert shown[rows["a/b/two.jpg"]]["album"] == ["x", "y"] and "tags" not in shown[rows["a/b/two.jpg"]]
    assert verify(work) == []
    meta.write_text(json.dumps({"image": "a/b/two.jpg", "rating": "high"}) + "\n")
    assert main(["index", "add", str(work), "--images", str(more), "--metadata", str(meta), "--quiet"]) != 0
    assert "'rating' is a number field" in capsys.readouterr().err
    assert verify(work) == []


def test_an_index_without_fields_opens_and_add_gives_it_fields(index_dir, small, tmp_path, model, capsys):
    old = tmp_path / "old"
    shutil.copytree(index_dir, old)
    conn = sqlite3.connect(old / layout.METADATA)
    conn.executescript("DROP TABLE image_fields; DROP TABLE fields;")
    conn.commit()
    conn.close()
    manifest = layout.read_manifest(old)
    layout.write_manifest(old, {k: v for k, v in manifest.items() if k not in ("files", "format_version", "updated")})
    index = Index(old)
    assert index.field_types == {} and index.info()["fields"] == {}
    hits = Searcher(index, model).search_text(["a photo"], k=2, candidates=4)[0].hits
    assert len(hits) == 2 and "folder" not in hits[0].metadata
    meta = tmp_path / "meta.jsonl"
    meta.write_text(json.dumps({"image": "a/b/two.jpg", "album": "late"}) + "\n")
    assert main(["index", "add", str(old), "--images", str(small[0]), "--metadata", str(meta), "--quiet"]) == 0
    assert Index(old).field_types == {"album": "string"} and verify(old) == []


def test_typing_rules():
    assert photo_fields.infer_type(["1", 2, "3.5"]) == "number"
    assert photo_fields.infer_type(["2024-01-01", "2024-01-02T10:00"]) == "date"
    assert photo_fields.infer_type([True, False]) == "bool"
    assert photo_fields.infer_type(["1", "x"]) == "string"
    assert photo_fields.parse_date("2024-01-01T00:00:00Z") == photo_fields.parse_date("2024-01-01") == 1704067200.0
    assert photo_fields.parse_date("2024-01-01T02:00:00+02:00") == 1704067200.0
    assert photo_fields.parse_date("yesterday") is None and photo_fields.parse_date("2024-13-01") is None
    with pytest.raises(photo_fields.FieldError):
        photo_fields.typed({0: {"bad name!": ["x"]}}, {}, {})
