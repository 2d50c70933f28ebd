"""A Qdrant-backed index whose embedded store was damaged is refused at open (what ``serve`` and ``index info``
do) and by ``index verify``, in one line naming the collection: bytes flipped in a segment's global or local
vector file, a deleted ``segments/``, a truncated ``chunk_0.mmap``. The untouched store opens and verifies, and
what ``qdrant.json`` records follows adds and deletes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import build_index, sample_files
from alignsearch.cli import main

pytest.importorskip("qdrant_edge", reason="the Qdrant backend needs the qdrant extra (pip install -e '.[qdrant]')")

from alignsearch.indexer import layout, qdrant_engines  # noqa: E402
from alignsearch.indexer.index import Index, verify  # noqa: E402


@pytest.fixture(scope="module")
def built_qdrant(tmp_path_factory, photos) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qtamper")
    assert build_index(*photos, root / "index", "--store", "qdrant", "--qdrant-path", str(root / "store")) == 0
    qdrant_engines.release()
    shutil.copytree(root / "store", root / "store.orig")
    return root / "index", root / "store"


@pytest.fixture
def index(built_qdrant):
    """The built index; its embedded store is put back as built after the test."""
    folder, store = built_qdrant
    qdrant_engines.release()
    yield folder
    qdrant_engines.release()
    shutil.rmtree(store)
    shutil.copytree(store.with_name("store.orig"), store)


def _collection(folder: Path, name: str = "images") -> Path:
    entry = json.loads((folder / layout.MANIFEST).read_text())["collections"][name]["qdrant"]
    return Path(entry["path"]) / entry["collection"]


def _vector_files(folder: Path, vector: str) -> list[Path]:
    files = sorted(_collection(folder).glob(f"segments/*/vector_storage-{vector}/vectors/chunk_0.mmap"))
    assert files
    return files


def _refused_everywhere(folder: Path, words: str, capsys) -> None:
    """Index open, ``index verify``, ``index info`` and ``serve`` all refuse, in one line naming ``words``."""
    with pytest.raises(layout.IndexError_) as err:
        Index(folder, use_gpu=False)
    assert words in str(err.value) and "\n" not in str(err.value)
    qdrant_engines.release()
    problems = verify(folder)
    assert problems and any(words in p for p in problems), problems
    qdrant_engines.release()
    capsys.readouterr()
    for argv in (["index", "verify", str(folder)], ["index", "info", str(folder)],
                 ["serve", "--index", str(folder), "--port", "0", "--device", "cpu"]):
        assert main(argv) != 0, argv
        qdrant_engines.release()
        err_text = capsys.readouterr().err.strip()
        assert words in err_text and "internal error" not in err_text and "Traceback" not in err_text, (argv, err_text)
        if argv[1] != "verify":
            assert len(err_text.splitlines()) == 1, err_text


def test_the_untouched_store_opens_and_verifies(index):
    assert verify(index) == []
    qdrant_engines.release()
    state = json.loads((index / "images" / "qdrant.json").read_text())
    assert state["check"]["points"] == {"global": 16, "local": 16} and len(state["check"]["sample"]) == 16
    assert Index(index, use_gpu=False).images.live == 16


def _flip(path: Path, count: int = 200) -> None:
    """Flip ``count`` bytes of the vectors a file holds (its non-zero bytes: the rest is preallocated space)."""
    data = bytearray(path.read_bytes())
    used = np.flatnonzero(np.frombuffer(bytes(data), dtype=np.uint8))
    assert len(used) > count
    for i in np.random.default_rng(0).choice(used, count, replace=False):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("vector", ["global", "local"])
def test_flipped_bytes_in_a_vector_file_are_refused(index, capsys, vector):
    for path in _vector_files(index, vector):
        _flip(path)
    _refused_everywhere(index, "vectors differ from those written", capsys)


def test_a_deleted_segments_folder_is_refused(index, capsys):
    shutil.rmtree(_collection(index) / "segments")
    _refused_everywhere(index, "0 points with global vectors, 16 recorded (fewer than written)", capsys)


def test_a_truncated_vector_file_is_refused(index, capsys):
    for path in _vector_files(index, "global"):
        with open(path, "r+b") as fh:
            fh.truncate(100)
    _refused_everywhere(index, "its data cannot be read", capsys)


def test_records_follow_adds_and_deletes(photos, tmp_path):
    from alignsearch.indexer.build import BuildOptions, build
    from alignsearch.indexer.qdrant_store import QdrantGlobalBackend, QdrantLocalBackend, QdrantSettings
    from alignsearch.indexer.update import add, delete
    from alignsearch.models import load_model

    images, captions = photos
    files = sorted(p.relative_to(images).as_posix() for p in sample_files(images))
    out, store = tmp_path / "index", tmp_path / "store"
    model = load_model(None, device="cpu")
    settings = QdrantSettings(path=str(store))
    build(model, BuildOptions(images=images, captions=captions, out=out, progress=False, files=files[:6],
                              local_codec="none", faiss_factory="qdrant", backend=QdrantGlobalBackend(settings),
                              local_backend=QdrantLocalBackend(settings)))
    add(model, out, BuildOptions(images=images, captions=captions, out=out, progress=False, files=files[6:9]))
    delete(out, [files[0], files[7]])
    state = json.loads((out / "images" / "qdrant.json").read_text())
    assert state["check"]["points"] == {"global": 7, "local": 7}
    assert sum(v[0] is not None for v in state["check"]["sample"].values()) == 7
    assert verify(out) == []
