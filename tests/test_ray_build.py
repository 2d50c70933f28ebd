"""``index build --engine ray`` on a local Ray instance (the machine's 2 CPUs): the same index as a local build,
a build killed mid-way resumes from its finished shards, and an unreachable cluster is a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from alignsearch.cli import main
from alignsearch.indexer import layout
from alignsearch.indexer.index import Index

from conftest import N_CAPTIONS, N_IMAGES, REPO, build_index, kill_after_first_shard, sample_files

ray = pytest.importorskip("ray", reason="the Ray engine's tests need Ray (pip install -e '.[dev]')")

RAY_ARGS = ("--engine", "ray", "--shard-size", "4", "--batch-size", "4")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (a build joins it instead of starting its own)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error", object_store_memory=256 * 2**20)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    """Each collection's ids, global vectors and local vectors (SQfp16 codes read back as float16)."""
    out = {}
    for name in layout.COLLECTIONS:
        index = faiss.read_index(str(folder / name / layout.GLOBAL_FILE))
        out[f"{name}.ids"] = faiss.vector_to_array(index.id_map)
        out[f"{name}.global"] = index.index.reconstruct_n(0, index.ntotal)
        out[f"{name}.local"] = np.load(folder / name / layout.CODES_FILE).view(np.float16).astype(np.float32)
        out[f"{name}.offsets"] = np.load(folder / name / layout.OFFSETS_FILE)
    return out


def assert_same_index(got: Path, expected: Path) -> None:
    """Same ids, rows and report; vectors equal within float tolerance (another batching, other threads)."""
    a, b = _arrays(got), _arrays(expected)
    for key in b:
        if key.endswith((".ids", ".offsets")):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            np.testing.assert_allclose(a[key], b[key], atol=2e-3, rtol=0, err_msg=key)
    for name, count in (("images", N_IMAGES), ("captions", N_CAPTIONS + 1)):
        rows = list(range(count))
        assert Index(got).rows(name, rows) == Index(expected).rows(name, rows)
    report = json.loads((got / "build_report.json").read_text())
    assert report == json.loads((expected / "build_report.json").read_text())
    assert main(["index", "verify", str(got)]) == 0


@pytest.mark.slow
def test_ray_build_equals_the_local_build(local_ray, photos, built, tmp_path, capsys):
    out = tmp_path / "index"
    assert build_index(*photos, out, *RAY_ARGS) == 0
    assert json.loads(capsys.readouterr().out)["images_indexed"] == N_IMAGES
    assert_same_index(out, built)
    assert not out.with_name("index.partial").exists()


@pytest.mark.slow
def test_cpu_actors_leave_cpus_to_the_decode_tasks(local_ray):
    from alignsearch.indexer.ray_engine import RayDistributor
    from alignsearch.models import load_model

    with RayDistributor(load_model(device="cpu")) as distributor:
        pool = distributor.pool()
    assert pool["num_cpus"] < 1 and "num_gpus" not in pool  # a whole CPU each would starve the read tasks
    assert pool["compute"].min_size == pool["compute"].max_size == 1
    assert ray.is_initialized()  # joined the running instance: leaving it is not its to shut down


@pytest.mark.slow
def test_a_worker_that_fails_is_one_line_naming_why(local_ray, photos, tmp_path):
    from alignsearch.indexer.plan import image_tasks
    from alignsearch.indexer.ray_engine import RayDistributor, RaySettings
    from alignsearch.models import load_model

    model = load_model(device="cpu")
    model.fingerprint = "0123456789abcdef"  # the folder's model is not this one: each actor refuses it
    images, rel = str(photos[0]), sample_files(photos[0])[0].relative_to(photos[0]).as_posix()
    with RayDistributor(model, RaySettings(progress=False), batch_size=4) as distributor:
        with pytest.raises(RuntimeError) as failed:
            distributor.run(image_tasks([rel], images, images, 4), tmp_path, lambda: None)
    message = str(failed.value)
    assert "\n" not in message and "not the one the build started with" in message and "0123456789abcdef" in message
    assert not (tmp_path / "shards" / "images-00000").exists()


@pytest.mark.slow
def test_a_failed_ray_build_resumes_from_its_finished_shards(local_ray, photos, built, tmp_path, monkeypatch,
                                                             capsys):
    from alignsearch.indexer import ray_engine, writer

    out = tmp_path / "index"
    shards = out.with_name("index.partial") / "shards"
    written: list[tuple[str, int]] = []

    def write(root, collection, number, shard, fail_after=None):
        if fail_after is not None and len(written) >= fail_after:
            raise OSError("injected failure after the first shard")
        writer.write_shard(root, collection, number, shard)
        written.append((collection, number))

    monkeypatch.setattr(ray_engine, "write_shard", lambda *a: write(*a, fail_after=1))
    assert build_index(*photos, out, *RAY_ARGS) == 2
    assert "injected failure" in capsys.readouterr().err
    (collection, number), = written
    assert not out.exists() and [p.name for p in shards.iterdir()] == [f"{collection}-{number:05d}"]

    written.clear()
    monkeypatch.setattr(ray_engine, "write_shard", write)
    assert build_index(*photos, out, *RAY_ARGS) == 0
    images_shards = (N_IMAGES + 3 + 3) // 4  # 16 photos and 3 broken files, 4 per shard
    assert sorted(n for c, n in written if c == "images") == [n for n in range(images_shards) if n != number]
    assert_same_index(out, built)
    assert not shards.parent.exists()


@pytest.mark.slow
def test_a_killed_ray_build_resumes_on_a_running_cluster(local_ray, photos, built, tmp_path):
    """A driver killed with SIGKILL (its job's actors go with it; the cluster stays), then run again."""
    images, captions = photos
    out = tmp_path / "index"
    cmd = [sys.executable, "-m", "alignsearch", "index", "build", "--images", str(images), "--captions",
           str(captions), "--out", str(out), "--quiet", *RAY_ARGS, "--ray-address", local_ray]
    shards = kill_after_first_shard(cmd, out, timeout=180)
    assert len(list(shards.glob("images-*[0-9]"))) < (N_IMAGES + 3 + 3) // 4
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=300).returncode == 0
    assert_same_index(out, built)


def test_an_unreachable_ray_address_is_one_line_and_quick(photos, tmp_path, capsys):
    start = time.monotonic()
    assert build_index(*photos, tmp_path / "x", "--engine", "ray", "--ray-address", "127.0.0.1:9") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Ray cluster answers at 127.0.0.1:9" in err and "Traceback" not in err
    assert time.monotonic() - start < 30 and not (tmp_path / "x").exists()
    assert not (tmp_path / "x.partial").exists()


@pytest.mark.parametrize("argv, message", [
    (("--ray-address", "127.0.0.1:9"), "--ray-address goes with --engine ray"),
    (("--engine", "ray", "--ray-address", "nohostport"), "--ray-address must be HOST:PORT"),
])
def test_bad_ray_options_are_one_line(photos, tmp_path, capsys, argv, message):
    assert build_index(*photos, tmp_path / "x", *argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_without_ray_installed_the_engine_is_a_one_line_hint(photos, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where Ray is not installed
    assert build_index(*photos, tmp_path / "x", "--engine", "ray") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'alignsearch[ray]'" in err
    assert not (tmp_path / "x").exists()


def _ray_processes() -> set[int]:
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
            and (p / "cmdline").exists() and b"ray" in _read(p / "cmdline")}


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the build's watchdog reads /proc (Linux)")
def test_a_killed_build_leaves_no_ray_process_behind(photos, tmp_path):
    """A build that started its own Ray instance, killed with SIGKILL: its raylet's agents (re-parented to init)
    are ended too."""
    images, captions = photos
    out = tmp_path / "index"
    before = _ray_processes()
    cmd = [sys.executable, "-m", "alignsearch", "index", "build", "--images", str(images), "--captions",
           str(captions), "--out", str(out), "--quiet", *RAY_ARGS]
    kill_after_first_shard(cmd, out, timeout=180)
    deadline = time.monotonic() + 20
    while (left := _ray_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [_read(Path(f"/proc/{pid}/cmdline"))[:80] for pid in left]
