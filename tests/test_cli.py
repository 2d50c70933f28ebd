"""The `alignsearch` command explains itself: fast help, every option documented with its default, and each
wrong call answered with one line that says what to do, a non-zero exit, and nothing left behind or rewritten."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignsearch.cli import build_parser, main, parse

from conftest import sample_files

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "faiss", "fastapi", "uvicorn", "numpy", "PIL", "ray")


def _parsers(parser: argparse.ArgumentParser, name: str = "alignsearch"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from _parsers(child, f"{name} {sub}")


def _run(*argv: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "alignsearch", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_help_imports_no_heavy_library():
    code = ("import sys, alignsearch.cli as c; c.build_parser(); "
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


@pytest.mark.parametrize("command", ["", "train", "eval", "index", "index build", "index delete", "serve", "demo",
                                     "bench"])
def test_help_answers_at_once(command):
    best = float("inf")
    for _ in range(3):  # the best of three: a busy machine slows one run, not what the command imports
        start = time.perf_counter()
        result = _run(*command.split(), "--help")
        best = min(best, time.perf_counter() - start)
        assert result.returncode == 0 and result.stdout.startswith("usage: alignsearch")
    assert best < 1.0, f"`alignsearch {command} --help` took {best:.2f} s"  # about 0.12 s on an idle machine


def test_every_option_has_help_text_and_shows_its_default():
    for name, parser in _parsers(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
                continue
            label = "/".join(action.option_strings) or action.dest
            assert action.help, f"{name} {label} has no help text"
            if action.default not in (None, False):
                shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
                helped = parser._get_formatter()._get_help_string(action)
                assert "default" in helped, f"{name} {label}: its default {shown} is not shown"
        assert "%(" not in text



@pytest.mark.parametrize("argv, line", [
    (["index", "build", "--images", "photos"],
     "alignsearch index build: error: the following arguments are required: --out (see --help)"),
    ([], "alignsearch: error: the following arguments are required: COMMAND (see --help)"),
    (["index"], "alignsearch index: error: the following arguments are required: ACTION (see --help)"),
    (["serve", "--port", "eighty"], "alignsearch serve: error: argument --port: invalid int value: 'eighty' (see --help)"),
    (["index", "build", "--images", "p", "--out", "o", "--engine", "spark"],
     "alignsearch index build: error: argument --engine: invalid choice: 'spark' (choose from 'local', 'ray') "
     "(see --help)"),
    (["eval", "--dataset"], "alignsearch eval: error: argument --dataset: expected one argument (see --help)"),
    (["index", "info", "idx", "--bogus"], "alignsearch: error: unrecognized arguments: --bogus (see --help)"),
])
def test_a_wrong_command_line_is_one_line_without_the_usage(argv, line, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert captured.err == line + "\n"  # argparse's usage block (13 lines for index build) is not printed


def test_help_still_prints_the_usage():
    for name, parser in _parsers(build_parser()):
        assert parser.format_help().startswith(f"usage: {name}")


def _fail_light(argv: list[str], cwd: Path) -> tuple[int, str, list[str]]:
    """Run ``main(argv)`` in a fresh interpreter: its status, its stderr, and which heavy libraries it imported."""
    code = ("import json, sys\nfrom alignsearch.cli import main\nstatus = main(sys.argv[1:])\n"
            f"print(json.dumps([status, [m for m in {HEAVY!r} if m in sys.modules]]))")
    result = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=120)
    status, loaded = json.loads(result.stdout)
    return status, result.stderr, loaded


@pytest.mark.parametrize("argv, message", [
    (["index", "build", "--images", "{tmp}/no/such/dir", "--out", "{tmp}/x"], "images folder not found: {tmp}/no/such/dir"),
    (["index", "build", "--images", "{tmp}/a.csv", "--out", "{tmp}/x"], "images folder is a file, not a folder: {tmp}/a.csv"),
    (["index", "build", "--images", "{tmp}/photos", "--captions", "{tmp}/none.csv", "--out", "{tmp}/x"],
     "captions file not found: {tmp}/none.csv"),
    (["index", "build", "--images", "{tmp}/photos", "--out", "{tmp}/a.csv"], "--out {tmp}/a.csv is a file"),
    (["index", "add", "{tmp}/no-index", "--images", "{tmp}/photos"], "no index at {tmp}/no-index"),
    (["index", "add", "{tmp}/index", "--images", "{tmp}/no/such/dir"], "images folder not found: {tmp}/no/such/dir"),
    (["index", "add", "{tmp}/index", "--images", "{tmp}/photos", "--captions", "{tmp}/photos"],
     "captions file is a folder, not a file: {tmp}/photos"),
    (["eval", "--dataset", "{tmp}/none.json", "--images", "{tmp}/photos"], "dataset file not found: {tmp}/none.json"),
    (["eval", "--dataset", "{tmp}/a.csv", "--images", "{tmp}/no/such/dir"], "images folder not found: {tmp}/no/such/dir"),
    (["train", "--dataset", "{tmp}/none.json", "--images", "{tmp}/photos", "--out", "{tmp}/run"],
     "dataset file not found: {tmp}/none.json"),
    (["train", "--dataset", "{tmp}/a.csv", "--images", "{tmp}/no/such/dir", "--out", "{tmp}/run"],
     "images folder not found: {tmp}/no/such/dir"),
    (["serve", "--index", "{tmp}/missing"], "no index at {tmp}/missing"),
    (["demo", "--no-serve", "--images", "{tmp}/no/such/dir"], "images folder not found: {tmp}/no/such/dir"),
])
def test_a_wrong_path_fails_in_one_line_before_torch_or_faiss_loads(tmp_path, argv, message):
    (tmp_path / "photos").mkdir()
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "manifest.json").write_text("{}")
    (tmp_path / "a.csv").write_text("image,caption\na.jpg,a dog on the grass\n")
    status, err, loaded = _fail_light([arg.format(tmp=tmp_path) for arg in argv], cwd=tmp_path)
    assert status == 2 and err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err
    assert err.startswith(f"alignsearch {' '.join(a for a in argv[:2] if not a.startswith(('-', '{')))}: error: ")
    assert not {"torch", "faiss", "transformers"} & set(loaded), f"{argv[:2]} imported {loaded} before failing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "index", "photos"]  # nothing written

def test_index_build_on_a_folder_without_images_leaves_nothing(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "notes.txt").write_text("not a photo")
    out = tmp_path / "index"
    assert main(["index", "build", "--images", str(tmp_path / "photos"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no images in" in err and "nothing to index" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no index/, no index.partial/, no lock


def test_a_folder_of_camera_raw_files_says_what_would_read_them(tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "trip").mkdir(parents=True)
    for name in ("IMG_1.CR2", "IMG_2.cr2", "trip/DSC_3.NEF", ".IMG_4.cr2"):  # the hidden one is not counted
        (photos / name).write_bytes(b"raw sensor data")
    assert main(["index", "build", "--images", str(photos), "--out", str(tmp_path / "index")]) == 2
    err = capsys.readouterr().err
    assert "nothing to index; not indexed: 2 .cr2, 1 .nef files (camera RAW: convert them to JPEG first)" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_build_and_add_name_the_photo_files_they_could_not_read(tmp_path, photos, capsys):
    """After a build and an add, the RAW files beside the photos are named on stderr with what reads them, and
    the build report keeps their count; the JSON on stdout is the usual summary."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(sample_files(photos[0])[0], folder / "a.png")
    (folder / "b.nef").write_bytes(b"raw sensor data")
    out = tmp_path / "index"
    assert main(["index", "build", "--images", str(folder), "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "not indexed: 1 .nef file (camera RAW: convert them to JPEG first)" in captured.err
    assert "not_read" not in captured.out and json.loads(captured.out)["images_indexed"] == 1
    assert json.loads((out / "build_report.json").read_text())["not_read"] == {".nef": 1}
    shutil.copy(sample_files(photos[0])[1], folder / "c.png")
    (folder / "d.NEF").write_bytes(b"raw sensor data")
    assert main(["index", "add", str(out), "--images", str(folder), "--quiet", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "not indexed: 2 .nef files (camera RAW" in captured.err and json.loads(captured.out)["images_added"] == 1


def test_index_build_where_every_image_is_unreadable_leaves_no_partial_folder(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"not a jpeg")
    (photos / "b.png").write_bytes(b"")
    out = tmp_path / "index"
    assert main(["index", "build", "--images", str(photos), "--out", str(out), "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "nothing was indexed: all 2 items were skipped" in err and "a.jpg" in err
    assert not out.exists() and not out.with_name("index.partial").exists()


def test_index_commands_on_a_file_say_it_is_a_file(tmp_path, capsys):
    path = tmp_path / "index.json"
    path.write_text("{}")
    for argv in (["index", "info", str(path)], ["index", "verify", str(path)],
                 ["index", "delete", str(path), "--ids", "x"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "is a file, not an index" in err and "not found" not in err, argv


def test_index_info_on_a_missing_folder_says_how_to_build_one(tmp_path, capsys):
    assert main(["index", "info", str(tmp_path / "nope")]) == 2
    assert "alignsearch index build --images DIR" in capsys.readouterr().err


def test_serve_names_its_default_index_and_how_to_build_one(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "ALIGNSEARCH_INDEX"}
    help_text = " ".join(_run("serve", "--help", env=env).stdout.split())
    assert "(default: ./index, or $ALIGNSEARCH_INDEX when set)" in help_text
    result = _run("serve", env=env, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("alignsearch serve: error: no index at index: build one with "
                                    "`alignsearch index build")
    assert "--index DIR" in result.stderr and "Traceback" not in result.stderr
    env["ALIGNSEARCH_INDEX"] = str(tmp_path / "elsewhere")
    assert f"no index at {tmp_path / 'elsewhere'}" in _run("serve", env=env, cwd=tmp_path).stderr


def test_delete_of_unknown_ids_rewrites_nothing_and_fails(built, tmp_path, capsys):
    index = tmp_path / "index"
    shutil.copytree(built, index)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in index.rglob("*") if p.is_file()}
    assert main(["index", "delete", str(index), "--ids", "no-such-id", "neither/this.jpg"]) == 1
    err = capsys.readouterr().err
    assert "no-such-id" in err and "neither/this.jpg" in err and "not changed" in err
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in index.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no update folder left beside it either


def test_delete_of_known_and_unknown_ids_names_the_unknown(built, tmp_path, capsys):
    from alignsearch.indexer.index import Index

    index = tmp_path / "index"
    shutil.copytree(built, index)
    image_id = Index(index).conn.execute("SELECT id FROM images ORDER BY row LIMIT 1").fetchone()[0]
    assert main(["index", "delete", str(index), "--ids", image_id, "no-such-id"]) == 0
    captured = capsys.readouterr()
    assert '"images_deleted": 1' in captured.out and "no-such-id" in captured.err


def test_bench_with_a_missing_dataset_fails_before_loading_a_model(tmp_path, monkeypatch, capsys):
    import alignsearch.models.factory

    monkeypatch.setattr(alignsearch.models.factory, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["bench", "--dataset", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "out")]) == 2
    assert "--dataset" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_bench_results_name_the_command_that_was_run(monkeypatch):
    import alignsearch.bench.cli

    assert parse(["bench", "--quick", "--tag", "my run"]).command_line == "alignsearch bench --quick --tag 'my run'"
    seen = []
    monkeypatch.setattr(alignsearch.bench.cli, "run", lambda args: seen.append(args.command_line) or 0)
    assert alignsearch.bench.cli.main(["--quick"]) == 0
    assert seen == ["python -m alignsearch.bench --quick"]


def _listening() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def test_a_busy_port_is_found_before_the_model_loads(built, monkeypatch, capsys):
    import alignsearch.indexer.search
    import alignsearch.service.demo

    monkeypatch.setattr(alignsearch.indexer.search.Searcher, "open", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(alignsearch.service.demo, "prepare", lambda *a, **k: pytest.fail("the demo index was built"))
    busy, port = _listening()
    with busy:
        assert main(["serve", "--index", str(built), "--port", str(port)]) == 2
        assert f"port {port} on 127.0.0.1 is already in use" in capsys.readouterr().err
        assert main(["demo", "--port", str(port)]) == 2
        assert "already in use" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_need_no_key(host):
    from alignsearch.service.serve import refuse_open

    refuse_open(host, None, False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1"])
def test_a_non_loopback_host_needs_a_key_or_consent(host):
    from alignsearch.service.serve import refuse_open

    with pytest.raises(ValueError, match=r"reachable from other machines and no API key is set.*--allow-open"):
        refuse_open(host, None, False)
    with pytest.raises(ValueError):
        refuse_open(host, "", False)  # an empty key (compose's ${ALIGNSEARCH_API_KEY:-}) is no key
    refuse_open(host, "k", False)
    refuse_open(host, None, True)


def test_a_host_that_is_no_address_is_left_to_bind_to_report(capsys):
    from alignsearch.service.serve import bind, refuse_open

    refuse_open("no-such-host.invalid", None, False)
    with pytest.raises(OSError, match="not an address of this machine"):
        bind("no-such-host.invalid", 0)


def test_serve_refuses_0_0_0_0_without_a_key_before_anything_loads(built, monkeypatch, capsys):
    import alignsearch.indexer.search

    monkeypatch.delenv("ALIGNSEARCH_API_KEY", raising=False)
    monkeypatch.delenv("ALIGNSEARCH_ALLOW_OPEN", raising=False)
    monkeypatch.setattr(alignsearch.indexer.search.Searcher, "open", lambda *a, **k: pytest.fail("the model was loaded"))
    busy, port = _listening()
    with busy:
        assert main(["serve", "--index", str(built), "--host", "0.0.0.0", "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no API key is set" in err and "--allow-open" in err
        assert main(["demo", "--host", "::", "--port", str(port)]) == 2
        assert "no API key is set" in capsys.readouterr().err
        # with the consent, it goes on to the next check (here the busy port, on every interface)
        assert main(["serve", "--index", str(built), "--host", "0.0.0.0", "--port", str(port), "--allow-open"]) == 2
        assert "no API key" not in capsys.readouterr().err


def test_an_unexpected_error_is_one_line(monkeypatch, capsys):
    import alignsearch.indexer.cli

    monkeypatch.delenv("ALIGNSEARCH_DEBUG", raising=False)
    monkeypatch.setattr(alignsearch.indexer.cli, "run_info", lambda args: {}["boom"])
    assert main(["index", "info", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: KeyError" in err and "Traceback" not in err


@pytest.mark.slow
def test_serve_says_what_it_serves_in_one_line(built, tmp_path):
    from alignsearch.indexer.index import Index

    counts = Index(built).manifest["counts"]
    busy, port = _listening()
    busy.close()
    proc = subprocess.Popen([sys.executable, "-m", "alignsearch", "serve", "--index", str(built), "--port", str(port),
                             "--device", "cpu", "--log-level", "warning"], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()  # blocks until the model is loaded (or the server fails)
        assert first.rstrip("\n") == (f"alignsearch: serving {counts['images']} images / {counts['captions']} "
                                      f"captions from {built} on http://127.0.0.1:{port}/ (Ctrl-C stops it)")
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=30)[0]
    assert "Loading weights" not in first + rest and "Traceback" not in rest
    assert not re.search(r"\{'captions'", first + rest)
