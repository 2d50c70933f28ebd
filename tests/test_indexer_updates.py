"""Updates and crash safety: a failed or killed update leaves the previous index valid and untouched, add is
idempotent and never reuses ids, one writer at a time, codecs that need training, the streaming store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import N_CAPTIONS, N_IMAGES, default_regions, sample_files
from alignsearch.indexer import layout, local_store
from alignsearch.indexer.index import Index, verify
from alignsearch.indexer.search import Searcher
from alignsearch.models import load_model
from alignsearch.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return load_model(device="cpu")


@pytest.fixture()
def index_copy(built, tmp_path) -> Path:
    out = tmp_path / "index"
    shutil.copytree(built, out)
    return out


def _photo(photos, n: int = 0) -> Path:
    """The n-th real photo of the fixture (the broken files are named otherwise)."""
    return sample_files(photos[0])[n]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_update_leaves_the_index_untouched(index_copy, photos, tmp_path, monkeypatch):
    extra = tmp_path / "more"
    extra.mkdir()
    shutil.copy(_photo(photos), extra / "new.jpg")
    before = _snapshot(index_copy)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(layout, "write_manifest", boom)  # fails after every data file of the copy was rewritten
    assert main(["index", "add", str(index_copy), "--images", str(extra), "--quiet"]) == 2
    caption = Index(index_copy).conn.execute("SELECT id FROM captions ORDER BY row LIMIT 1").fetchone()[0]
    assert main(["index", "delete", str(index_copy), "--ids", caption]) == 2
    monkeypatch.undo()
    assert _snapshot(index_copy) == before  # hard-linked files were replaced in the copy, never written through
    assert verify(index_copy) == []
    assert main(["index", "add", str(index_copy), "--images", str(extra), "--quiet"]) == 0
    assert Index(index_copy).manifest["counts"]["images"] == N_IMAGES + 1
    assert not list(tmp_path.glob(".index.*[!k]"))  # no .update / .old / shards left (only the lock file)


@pytest.mark.slow
def test_an_add_killed_mid_way_leaves_the_previous_index(index_copy, photos, tmp_path):
    extra = tmp_path / "more"
    extra.mkdir()
    for n in range(6):
        shutil.copy(_photo(photos, n), extra / f"new{n}.jpg")
    cmd = [sys.executable, "-m", "alignsearch", "index", "add", str(index_copy), "--images", str(extra), "--quiet",
           "--batch-size", "1", "--shard-size", "1", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / ".index.update.shards" / "shards" / "images-00000"
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the add must be killed while it runs"
    assert verify(index_copy) == []
    assert Index(index_copy).manifest["counts"]["images"] == N_IMAGES
    assert subprocess.run(cmd, cwd=REPO, capture_output=True).returncode == 0  # the lock died with the process
    assert Index(index_copy).manifest["counts"]["images"] == N_IMAGES + 6 and verify(index_copy) == []


@pytest.mark.slow
def test_add_is_idempotent_and_never_reuses_ids(index_copy, photos, tmp_path, model):
    extra = tmp_path / "more"
    extra.mkdir()
    shutil.copy(_photo(photos), extra / "late.jpg")
    caps = tmp_path / "late.jsonl"
    lines = [{"image": "late.jpg", "caption": "a picture added later"},
             {"caption": "another lone caption"},
             {"image": _snapshot_first_image(index_copy), "caption": "one more caption for an old image"}]
    caps.write_text("".join(json.dumps(x) + "\n" for x in lines))
    old = _snapshot_first_image(index_copy)
    had = Index(index_copy).conn.execute("SELECT COUNT(*) FROM captions WHERE image_id = ?", (old,)).fetchone()[0]
    lone = tmp_path / "lone.jsonl"  # a caption whose image is not indexed yet: standalone for now
    lone.write_text(json.dumps({"image": "later.jpg", "caption": "waiting for its picture"}) + "\n")
    assert main(["index", "add", str(index_copy), "--images", str(tmp_path / "empty"), "--captions", str(lone),
                 "--quiet"]) == 2  # no such images folder: a clear error, nothing changed
    (tmp_path / "empty").mkdir()
    assert main(["index", "add", str(index_copy), "--images", str(tmp_path / "empty"), "--captions", str(lone),
                 "--quiet"]) == 0
    assert main(["index", "add", str(index_copy), "--images", str(extra), "--captions", str(caps), "--quiet"]) == 0
    index = Index(index_copy)
    ids = [r[0] for r in index.conn.execute("SELECT id FROM captions")]
    assert len(ids) == len(set(ids)) == N_CAPTIONS + 1 + 1 + 3
    assert "late.jpg#0" in ids
    assert f"{old}#{had}" in ids  # the next caption number of that image: the first ones are taken
    waiting = index.conn.execute("SELECT image_id FROM captions WHERE text = 'waiting for its picture'").fetchone()
    assert waiting[0] is None

    shutil.copy(_photo(photos, 1), extra / "later.jpg")
    before = index.manifest["counts"]
    assert main(["index", "add", str(index_copy), "--images", str(extra), "--captions", str(caps), "--quiet"]) == 0
    index = Index(index_copy)
    assert index.manifest["counts"] == {**before, "images": before["images"] + 1}  # only later.jpg is new
    waiting = index.conn.execute("SELECT image_id FROM captions WHERE text = 'waiting for its picture'").fetchone()
    assert waiting[0] == "later.jpg"  # linked to its image once that was added
    assert verify(index_copy) == []
    searcher = Searcher(index, model)
    assert searcher.get_image("late.jpg")["file"] == str((extra / "late.jpg").resolve())
    hits = searcher.search_text(["a picture"], k=N_IMAGES + 2, candidates=N_IMAGES + 2)[0].hits
    assert {"late.jpg", "later.jpg"} <= {h.id for h in hits}


def _snapshot_first_image(folder: Path) -> str:
    return Index(folder, check="none").conn.execute("SELECT id FROM images ORDER BY row LIMIT 1").fetchone()[0]


def test_one_writer_at_a_time(index_copy, photos, capsys):
    caption = Index(index_copy).conn.execute("SELECT id FROM captions ORDER BY row LIMIT 1").fetchone()[0]
    with layout.exclusive(index_copy):
        assert main(["index", "delete", str(index_copy), "--ids", caption]) == 2
        assert "another build or update" in capsys.readouterr().err
        assert main(["index", "build", "--images", str(photos[0]), "--out", str(index_copy), "--quiet"]) == 2
    assert verify(index_copy) == []


def test_delete_through_a_symlink_changes_the_real_index_under_its_one_lock(index_copy, tmp_path, capsys):
    link = tmp_path / "links" / "current"
    link.parent.mkdir()
    link.symlink_to(index_copy, target_is_directory=True)
    caption = Index(index_copy).conn.execute("SELECT id FROM captions ORDER BY row LIMIT 1").fetchone()[0]
    before = Index(index_copy).manifest["counts"]["captions"]
    with layout.exclusive(index_copy):  # a writer of the real path blocks one that names the symlink
        assert main(["index", "delete", str(link), "--ids", caption]) == 2
        assert "another build or update" in capsys.readouterr().err
    assert main(["index", "delete", str(link), "--ids", caption]) == 0
    assert link.is_symlink() and link.resolve() == index_copy.resolve()
    assert Index(index_copy).manifest["counts"]["captions"] == before - 1 and verify(index_copy) == []
    assert not list(link.parent.glob(".current*"))  # no lock, copy or leftovers beside the symlink


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["SQ8", "PQ16", "compact"])
def test_trained_codecs_without_captions_then_add_captions(photos, tmp_path, model, codec, capsys):
    out = tmp_path / "idx"
    assert main(["index", "build", "--images", str(photos[0]), "--out", str(out), "--local-codec", codec,
                 "--quiet"]) == 0  # no captions: the empty collection's codec is trained on the images' vectors
    assert main(["index", "add", str(out), "--images", str(photos[0]), "--captions", str(photos[1]), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["index", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"]["captions"] == N_CAPTIONS + 1 and info["local_codec"] == codec
    code_size = {"SQ8": 384, "PQ16": 16, "compact": int(local_store.compact_pq(default_regions(), 384)[2:])}[codec]
    assert info["images"]["bytes_per_item"]["local"] == pytest.approx(default_regions() * code_size + 8, abs=30)
    searcher = Searcher(Index(out), model)
    caption = searcher.index.conn.execute("SELECT text, image_id FROM captions WHERE image_id IS NOT NULL").fetchone()
    hits = searcher.search_text([caption["text"]], k=N_IMAGES, candidates=N_IMAGES)[0].hits
    assert len(hits) == N_IMAGES and caption["image_id"] in [h.id for h in hits[:8]]


@pytest.mark.slow
def test_rebuild_replaces_an_existing_index_in_one_step(index_copy, photos, tmp_path):
    old_inode = (index_copy / layout.MANIFEST).stat().st_ino
    assert main(["index", "build", "--images", str(photos[0]), "--out", str(index_copy), "--quiet"]) == 0
    assert (index_copy / layout.MANIFEST).stat().st_ino != old_inode
    assert Index(index_copy).manifest["counts"]["captions"] == 0 and verify(index_copy) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.lock", "index"]


def test_streaming_store_appends_like_one_write(tmp_path):
    rng = np.random.default_rng(1)
    lengths = [np.array([3, 1, 4]), np.array([2, 5])]
    parts = [rng.standard_normal((int(n.sum()), 16)).astype(np.float32) for n in lengths]
    codec = local_store.make_codec(16, "SQ8", np.concatenate(parts))
    local_store.write_store(tmp_path / "one", codec, local_store.encode(codec, np.concatenate(parts)),
                            np.concatenate(lengths))
    local_store.write_store_streaming(tmp_path / "two", codec, [parts[0]], lengths[0])
    first = local_store.LocalStore.open(tmp_path / "two")
    local_store.write_store_streaming(tmp_path / "two", codec, [parts[1]], lengths[1], previous=first)
    one, two = local_store.LocalStore.open(tmp_path / "one"), local_store.LocalStore.open(tmp_path / "two")
    np.testing.assert_array_equal(one.codes, two.codes)
    np.testing.assert_array_equal(one.offsets, two.offsets)
    assert len(first) == 3 and len(two) == 5  # the first store's memory map still reads its own (old) file


@pytest.mark.slow
def test_add_with_another_model_is_refused_naming_both_fingerprints(index_copy, photos, tmp_path, model, capsys):
    from alignsearch.models import ModelConfig, create_model, save_model

    other = save_model(create_model(ModelConfig()), tmp_path / "other-model")
    assert main(["index", "add", str(index_copy), "--images", str(photos[0]), "--model",
                 str(tmp_path / "other-model"), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "fingerprint" in err and other in err and model.fingerprint in err
    with pytest.raises(ValueError, match=other):
        Searcher.open(index_copy, str(tmp_path / "other-model"), device="cpu")
    assert verify(index_copy) == []


def test_deleting_an_image_deletes_its_captions_across_a_restart(index_copy, model, capsys):
    from alignsearch.models.preprocess import load_image

    index = Index(index_copy)
    image_id, n = index.conn.execute("SELECT image_id, COUNT(*) FROM captions WHERE deleted = 0 AND image_id IS NOT "
                                     "NULL GROUP BY image_id ORDER BY COUNT(*) DESC LIMIT 1").fetchone()
    captions = {r[0] for r in index.conn.execute("SELECT id FROM captions WHERE image_id = ?", (image_id,))}
    before = index.manifest["counts"]
    photo = load_image(index.images_root / image_id)
    assert main(["index", "delete", str(index_copy), "--ids", image_id]) == 0
    report = json.loads(capsys.readouterr().out)
    assert n >= 2 and report["images_deleted"] == 1
    assert report["captions_deleted_with_images"] == report["captions_deleted"] == n
    searcher = Searcher(Index(index_copy), model)  # a restart: nothing but the index on disk
    assert searcher.index.manifest["counts"] == {**before, "images": before["images"] - 1, "images_deleted": 1,
                                                 "captions": before["captions"] - n, "captions_deleted": n}
    hits = searcher.search_image([photo], k=N_CAPTIONS, candidates=N_CAPTIONS)[0].hits
    assert hits and not captions & {h.id for h in hits} and all(h.image_id != image_id for h in hits)
    # a caption named with its image is deleted once, and counted as asked for
    other, caption = searcher.index.conn.execute("SELECT image_id, id FROM captions WHERE deleted = 0 AND image_id "
                                                 "IS NOT NULL ORDER BY row LIMIT 1").fetchone()
    left = searcher.index.conn.execute("SELECT COUNT(*) FROM captions WHERE deleted = 0 AND image_id = ?",
                                       (other,)).fetchone()[0]
    assert main(["index", "delete", str(index_copy), "--ids", other, caption]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["captions_deleted"] == left and report["captions_deleted_with_images"] == left - 1
    assert verify(index_copy) == []
    # a deleted photo added again is indexed again (a new row; the tombstone keeps its own, renamed id)
    root = searcher.index.images_root
    assert main(["index", "add", str(index_copy), "--images", str(root), "--quiet"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["images_added"] == 2, added
    searcher = Searcher(Index(index_copy), model)
    assert searcher.index.manifest["counts"]["images"] == before["images"]
    assert searcher.search_image([photo], k=1, candidates=N_CAPTIONS)[0].hits  # captions still searchable
    assert searcher.index.image_by_id(image_id) is not None and searcher.index.image_by_id(other) is not None
    assert verify(index_copy) == []


@pytest.fixture()
def small_disk(tmp_path):
    """A 1.5 MB tmpfs (mounting needs root: skipped elsewhere); unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_local_store_on_a_full_disk_is_an_oserror_not_sigbus(small_disk):
    code = f"""
import errno, faiss, numpy as np
from pathlib import Path
from alignsearch.indexer.local_store import make_codec, write_store
codec = make_codec(8, "SQ8", np.zeros((0, 8), np.float32), train=False)
codes = np.ones((4_000_000, 1), np.uint8)  # 4 MB of codes on a 1.5 MB disk
try:
    write_store(Path({str(small_disk)!r}) / "images", faiss.index_factory(8, "SQ8"), codes, np.array([len(codes)]))
except OSError as exc:
    print("ENOSPC" if exc.errno == errno.ENOSPC else exc)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ENOSPC", (result.returncode, result.stderr[-500:])
    assert not [p for p in small_disk.rglob("*") if p.is_file()]  # the temp file went with the error


@pytest.mark.slow
def test_a_full_disk_is_one_line_keeps_the_old_index_and_leaves_nothing(built, photos, small_disk, capsys):
    index = small_disk / "index"
    shutil.copytree(built, index)
    before = _snapshot(index)
    for argv in (["index", "build", "--images", str(photos[0]), "--captions", str(photos[1]), "--out", str(index),
                  "--quiet"],
                 ["index", "add", str(index), "--images", str(photos[0].parent / "more"), "--quiet"]):
        if argv[1] == "add":
            more = photos[0].parent / "more"
            more.mkdir(exist_ok=True)
            for n, path in enumerate(sample_files(photos[0])):
                shutil.copy(path, more / f"again-{n}{path.suffix}")
        assert main(argv) == 2, argv[1]
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no space left on the disk" in err, err
        assert _snapshot(index) == before and verify(index) == []
        assert sorted(p.name for p in small_disk.iterdir()) == [".index.lock", "index"]  # no partial work left
