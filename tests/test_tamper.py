"""A tampered index is refused at open (what ``serve`` and ``index info`` do) and by ``index verify``, in one line
naming the file: files left out of the manifest, a manifest edited without its seal, and damage that keeps the
checksums right (a re-sealed manifest) but breaks the structure (offsets, counts, dtypes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from alignsearch.cli import main
from alignsearch.indexer import layout
from alignsearch.indexer.index import Index, verify


@pytest.fixture
def index(built, tmp_path) -> Path:
    copy = tmp_path / "index"
    shutil.copytree(built, copy)
    return copy


def _manifest(folder: Path) -> dict:
    return json.loads((folder / layout.MANIFEST).read_text())


def _reseal(folder: Path, manifest: dict, changed: tuple[str, ...] = ()) -> None:
    """Write ``manifest`` as an attacker who knows the format would: checksums of ``changed`` files renewed and
    the seal recomputed."""
    for name in changed:
        if name in manifest["files"]:
            manifest["files"][name] = {"sha256": layout.sha256_file(folder / name),
                                       "bytes": (folder / name).stat().st_size}
    manifest["seal"] = layout.seal(manifest)
    (folder / layout.MANIFEST).write_text(json.dumps(manifest))


def _refused_everywhere(folder: Path, words: str, capsys) -> None:
    """Index open, ``index verify``, ``index info`` and ``serve`` all refuse, in one line naming ``words``."""
    with pytest.raises(layout.IndexError_) as err:
        Index(folder, use_gpu=False)
    assert words in str(err.value) and "\n" not in str(err.value)
    try:
        problems = verify(folder)
    except layout.IndexError_ as exc:  # a manifest it cannot read at all
        problems = [str(exc)]
    assert problems and any(words in p for p in problems), problems
    capsys.readouterr()
    for argv in (["index", "verify", str(folder)], ["index", "info", str(folder)],
                 ["serve", "--index", str(folder), "--port", "0", "--device", "cpu"]):
        assert main(argv) != 0, argv
        err_text = capsys.readouterr().err.strip()
        assert words in err_text and "internal error" not in err_text and "Traceback" not in err_text, (argv, err_text)
        if argv[1] != "verify":
            assert len(err_text.splitlines()) == 1, err_text


def _other_global(folder: Path, keep: float = 1.0, seed: int = 1) -> None:
    """Replace ``images/global.faiss`` by a valid FAISS index of other vectors (``keep`` of the items)."""
    original = faiss.read_index(str(folder / "images" / layout.GLOBAL_FILE))
    n, d = original.ntotal, original.d
    count = int(n * keep)
    swapped = faiss.IndexIDMap(faiss.IndexFlatIP(d))
    vectors = np.random.default_rng(seed).standard_normal((count, d)).astype(np.float32)
    swapped.add_with_ids(vectors, np.arange(count, dtype=np.int64))
    faiss.write_index(swapped, str(folder / "images" / layout.GLOBAL_FILE))


def test_the_untouched_copy_opens_and_verifies(index):
    assert verify(index) == []
    assert Index(index, use_gpu=False).images.live > 0


def test_a_file_left_out_of_the_manifest_and_swapped_is_refused(index, capsys):
    _other_global(index)
    manifest = _manifest(index)
    del manifest["files"]["images/global.faiss"]
    _reseal(index, manifest)
    _refused_everywhere(index, "global.faiss: not listed in the manifest", capsys)


def test_empty_files_and_flipped_bytes_are_refused(index, capsys):
    codes = index / "images" / layout.CODES_FILE
    data = bytearray(codes.read_bytes())
    rng = np.random.default_rng(0)
    for pos in rng.integers(128, len(data), 5000):
        data[pos] ^= 0xFF
    codes.write_bytes(bytes(data))
    manifest = _manifest(index)
    manifest["files"] = {}
    _reseal(index, manifest)
    _refused_everywhere(index, "not listed in the manifest", capsys)


def test_a_manifest_edited_without_its_seal_is_refused(index, capsys):
    manifest = _manifest(index)
    del manifest["files"]["images/global.faiss"]
    (index / layout.MANIFEST).write_text(json.dumps(manifest))
    _refused_everywhere(index, "manifest.json: the manifest's seal does not match", capsys)
    del manifest["seal"]
    (index / layout.MANIFEST).write_text(json.dumps(manifest))
    _refused_everywhere(index, "manifest.json: the manifest is not sealed", capsys)


def test_offsets_that_go_back_are_refused_with_a_resealed_manifest(index, capsys):
    path = index / "captions" / layout.OFFSETS_FILE
    offsets = np.load(path)
    offsets[1], offsets[2] = offsets[2] + 5, offsets[1]
    np.save(path, offsets)
    _reseal(index, _manifest(index), ("captions/offsets.npy",))
    _refused_everywhere(index, "offsets.npy: offsets do not start at 0 and increase", capsys)


def test_a_global_store_with_half_the_vectors_is_refused(index, capsys):
    _other_global(index, keep=0.5)
    _reseal(index, _manifest(index), ("images/global.faiss",))
    _refused_everywhere(index, "global store", capsys)


def test_codes_saved_as_float32_are_refused(index, capsys):
    path = index / "images" / layout.CODES_FILE
    np.save(path, np.load(path).astype(np.float32))
    _reseal(index, _manifest(index), ("images/codes.npy",))
    _refused_everywhere(index, "codes.npy: float32 array", capsys)


def test_a_damaged_sqlite_file_is_named(index, capsys):
    path = index / layout.METADATA
    data = bytearray(path.read_bytes())
    data[:16] = b"garbage garbage!"
    path.write_bytes(bytes(data))
    _reseal(index, _manifest(index), (layout.METADATA,))
    _refused_everywhere(index, "metadata.sqlite", capsys)


@pytest.mark.parametrize("content", [b"\x00\xff garbage", b"[" * 100_000 + b"]" * 100_000, b'{"format_version": 1}'],
                         ids=["garbage", "deep", "fields-missing"])
def test_a_garbage_or_deep_manifest_is_named(index, capsys, content):
    (index / layout.MANIFEST).write_bytes(content)
    with pytest.raises(layout.IndexError_) as err:
        Index(index, use_gpu=False)
    assert "manifest.json: corrupt manifest" in str(err.value)
    assert main(["index", "info", str(index)]) != 0
    err_text = capsys.readouterr().err.strip()
    assert "manifest.json: corrupt manifest" in err_text and len(err_text.splitlines()) == 1


def test_an_empty_collection_entry_is_named(index, capsys):
    manifest = _manifest(index)
    manifest["collections"]["images"] = {}
    _reseal(index, manifest)
    _refused_everywhere(index, "manifest.json: corrupt manifest (collection 'images' has no 'factory')", capsys)


def test_verify_seal_seals_an_older_manifest_only_when_all_else_verifies(index, capsys):
    manifest = _manifest(index)
    del manifest["seal"]
    (index / layout.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(layout.IndexError_, match="index verify --seal"):
        Index(index, use_gpu=False)
    assert main(["index", "verify", "--seal", str(index)]) == 0
    assert Index(index, use_gpu=False).images.live > 0
    manifest = _manifest(index)
    del manifest["seal"], manifest["files"]["images/global.faiss"]
    (index / layout.MANIFEST).write_text(json.dumps(manifest))
    assert main(["index", "verify", "--seal", str(index)]) == 1
    assert "global.faiss: not listed" in capsys.readouterr().err
    assert "seal" not in _manifest(index)


def test_what_a_killed_update_left_is_removed_at_the_next_open_unless_an_update_runs(index):
    leftovers = [index.with_name(f".{index.name}{suffix}") for suffix in (".update", ".update.shards", ".old")]
    for path in leftovers:
        (path / "images").mkdir(parents=True)
        (path / "images" / "codes.npy").write_bytes(b"\0" * 1000)
    with layout.exclusive(index):  # an update holds the lock: its files are kept
        Index(index, use_gpu=False)
        assert all(p.exists() for p in leftovers)
    Index(index, use_gpu=False)
    assert not any(p.exists() for p in leftovers)
