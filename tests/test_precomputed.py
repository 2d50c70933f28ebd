"""Precomputed region features end to end: `train --features`, `index build --features`, `eval --features` and a
served text search over that index, on synthetic bottom-up-style features made here (12 photos x up to 36
regions x 64), with a tiny random text backbone; and the errors: a missing feature file, a wrong width, an
image query or a photo request to such an index."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from alignsearch.cli import main
from alignsearch.models import BackboneConfig, HeadConfig, ModelConfig, load_model

DIM = 64
KEY = "test-key"
SUBJECTS = ["dog", "cat", "horse", "bird", "boat", "car", "child", "man", "woman", "bicycle", "tree", "house"]
PLACES = ["on the beach", "in the snow", "on a road", "in a park"]


def _names() -> list[str]:
    return [f"photo{i:02d}.jpg" for i in range(len(SUBJECTS))]


def _regions(i: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """Photo ``i``: 20 to 36 regions around its subject's centre (so a photo's regions are like each other)."""
    count = 20 + (i * 5) % 17
    return (centres[i] + 0.3 * rng.standard_normal((count, DIM))).astype(np.float32)


def make_set(root: Path, layout: str = "files") -> tuple[Path, Path]:
    """Captions (CSV: 9 train, 3 test photos, two captions each) and a features folder for them.

    ``layout`` ``files``: ``DIR/<stem>.npy`` per photo (the caption names ``photoNN.jpg``: found by its stem);
    ``split``: ``DIR/train.npy`` + ``DIR/train.ids.txt`` and ``DIR/test.npy`` + ``DIR/test.ids.txt`` (36 regions)."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((len(SUBJECTS), DIM)).astype(np.float32)
    features = root / "features"
    features.mkdir(parents=True)
    names = _names()
    rows = ["image,caption,split"]
    for i, name in enumerate(names):
        split = "test" if i % 4 == 3 else "train"
        rows += [f"{name},a {SUBJECTS[i]} {PLACES[i % 4]},{split}", f"{name},the {SUBJECTS[i]} alone,{split}"]
    captions = root / "captions.csv"
    captions.write_text("\n".join(rows) + "\n")
    arrays = [_regions(i, rng, centres) for i in range(len(names))]
    if layout == "files":
        for name, array in zip(names, arrays):
            np.save(features / (Path(name).stem + ".npy"), array)
    else:
        for split in ("train", "test"):
            chosen = [i for i in range(len(names)) if ("test" if i % 4 == 3 else "train") == split]
            np.save(features / f"{split}.npy", np.stack([_pad36(arrays[i]) for i in chosen]))
            (features / f"{split}.ids.txt").write_text("".join(names[i] + "\n" for i in chosen))
    return captions, features


def _pad36(array: np.ndarray) -> np.ndarray:
    return np.concatenate([array, array[: 36 - len(array)]])


def _config(path: Path, tiny_bert: str, dim: int = DIM) -> Path:
    ModelConfig(image_backbone=BackboneConfig("precomputed", feature_dim=dim),
                text_backbone=BackboneConfig("hf-text", tiny_bert), embed_dim=16,
                image_head=HeadConfig(layers=1, heads=2), text_head=HeadConfig(layers=1, heads=2)).save(path)
    return path


def _train(tmp_path: Path, captions: Path, features: Path, config: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", str(captions), "--features", str(features), "--out", str(tmp_path / "run"),
            "--config", str(config), "--batch-size", "4", "--val-size", "2", "--candidates", "3", "--lr", "3e-3",
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert) -> tuple[Path, Path, Path]:
    """A model trained two epochs on the per-photo-file layout: (captions, features, model folder)."""
    root = tmp_path_factory.mktemp("precomputed")
    captions, features = make_set(root)
    (features / "boxes").mkdir()  # box coordinates some extractors write: not read
    np.save(features / "boxes" / "photo00.npy", np.zeros((36, 4), np.float32))
    assert main(_train(root, captions, features, _config(root / "config.json", tiny_bert), "--epochs", "2")) == 0
    return captions, features, root / "run" / "model"


def test_train_from_features_saves_a_precomputed_model(trained):
    captions, features, model_dir = trained
    summary = json.loads((model_dir.parent / "training.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert summary["history"][1]["loss"] < summary["history"][0]["loss"]  # the heads learn from the features
    assert summary["skipped_images"] == []
    model = load_model(model_dir, device="cpu")
    assert (model.config.image_backbone.kind, model.config.image_backbone.feature_dim) == ("precomputed", DIM)
    assert not model.takes_images


def test_index_eval_and_served_text_search_over_features(trained, tmp_path):
    from alignsearch.indexer.index import Index
    from alignsearch.indexer.search import Searcher
    from alignsearch.models.precomputed import FeatureFolder, encode_arrays
    from alignsearch.service.launch import serve

    captions, features, model_dir = trained
    out = tmp_path / "index"
    assert main(["index", "build", "--features", str(features), "--captions", str(captions), "--model",
                 str(model_dir), "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    report = json.loads((out / "build_report.json").read_text())
    assert report["images_indexed"] == 12 and report["captions_indexed"] == 24 and report["skipped"] == []
    index = Index(out)
    ids = [r[0] for r in index.conn.execute("SELECT id FROM images ORDER BY id")]
    assert ids == _names()  # the captions' names, though the files are photoNN.npy
    linked = index.conn.execute("SELECT COUNT(*) FROM captions WHERE image_id IS NOT NULL").fetchone()[0]
    assert linked == 24

    # eval: the same build, image queries from the same features
    result = tmp_path / "eval.json"
    assert main(["eval", "--dataset", str(captions), "--features", str(features), "--model", str(model_dir),
                 "--candidates", "3", "--json", str(result), "--quiet", "--device", "cpu"]) == 0
    evaluation = json.loads(result.read_text())
    assert evaluation["meta"]["images"] == 3 and evaluation["meta"]["captions"] == 6
    assert evaluation["meta"]["rerank_kernel"] == "float32"  # a store this small keeps the default, unmeasured
    assert all(0 <= evaluation[m]["rsum"] <= 600 for m in ("global", "exhaustive", "two-stage"))

    # what the model itself ranks first for each caption, scoring every photo's regions directly
    model = load_model(model_dir, device="cpu")
    folder = FeatureFolder(features)
    images = encode_arrays(model, [folder.read(folder.find(n)) for n in _names()])
    texts = [r[0] for r in index.conn.execute("SELECT text FROM captions ORDER BY row")]
    expected = [_names()[int(i)] for i in model.scores(model.encode_texts(texts), images).argmax(1)]
    searcher = Searcher(index, model)
    assert [r.hits[0].id for r in searcher.search_text(texts, k=1, candidates=12)] == expected

    headers = {"Authorization": f"Bearer {KEY}"}
    with serve(out, "--model", str(model_dir), env={"ALIGNSEARCH_API_KEY": KEY}, ready_timeout=300) as url:
        for text, first in list(zip(texts, expected))[:4]:
            r = httpx.post(f"{url}/search/text", json={"query": text, "k": 3, "candidates": 12}, headers=headers,
                           timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["results"][0]["id"] == first
        image = httpx.post(f"{url}/search/image", files={"file": ("a.png", b"\x89PNG not read", "image/png")},
                           headers=headers, timeout=60)
        assert image.status_code == 400 and "precomputed region features" in image.json()["detail"]
        photo = httpx.get(f"{url}/images/{_names()[0]}", headers=headers, timeout=60)
        assert photo.status_code == 404 and "precomputed region features" in photo.json()["detail"]


def test_split_arrays_layout_trains_and_evaluates(tmp_path, tiny_bert):
    captions, features = make_set(tmp_path, layout="split")
    config = _config(tmp_path / "config.json", tiny_bert)
    assert main(_train(tmp_path, captions, features, config, "--epochs", "1")) == 0
    result = tmp_path / "eval.json"
    assert main(["eval", "--dataset", str(captions), "--features", str(features), "--model",
                 str(tmp_path / "run" / "model"), "--candidates", "3", "--json", str(result), "--quiet",
                 "--device", "cpu"]) == 0
    assert json.loads(result.read_text())["meta"]["images"] == 3


def test_missing_features_are_skipped_with_the_reason(tmp_path, tiny_bert, trained, caplog):
    captions, features = make_set(tmp_path)
    (features / "photo01.npy").unlink()  # a training photo
    (features / "photo03.npy").unlink()  # a test photo
    np.save(features / "photo05.npy", np.zeros((0, DIM), np.float32))  # no regions
    config = _config(tmp_path / "config.json", tiny_bert)
    assert main(_train(tmp_path, captions, features, config, "--epochs", "1")) == 0
    skipped = json.loads((tmp_path / "run" / "training.json").read_text())["skipped_images"]
    assert sorted(skipped) == ["photo01.jpg", "photo05.jpg"]
    assert "no region features (photo01.jpg.npy or photo01.npy" in caplog.text

    result = tmp_path / "eval.json"
    assert main(["eval", "--dataset", str(captions), "--features", str(features), "--model", str(trained[2]),
                 "--candidates", "2", "--json", str(result), "--quiet", "--device", "cpu"]) == 0
    meta = json.loads(result.read_text())["meta"]
    assert meta["images"] == 2 and meta["captions_dropped"] == 2
    assert any(s.startswith("photo03.jpg") or s == "photo03.jpg" for s in meta["skipped"])

    out = tmp_path / "index"
    assert main(["index", "build", "--features", str(features), "--captions", str(captions), "--model",
                 str(trained[2]), "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    report = json.loads((out / "build_report.json").read_text())
    assert report["images_indexed"] == 9 and report["captions_indexed"] == 24  # kept as standalone captions
    assert sorted(s["item"] for s in report["skipped"]) == ["photo01.jpg", "photo03.jpg", "photo05.jpg"]


def test_wrong_width_is_one_line_naming_the_file(tmp_path, tiny_bert, trained, capsys):
    captions, features = make_set(tmp_path)
    config = _config(tmp_path / "config.json", tiny_bert, dim=2048)
    assert main(_train(tmp_path, captions, features, config, "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "photo00.npy: 64-d region features" in err and "precomputed:2048" in err

    np.save(features / "photo04.npy", np.zeros((36, 32), np.float32))  # one file of another width
    assert main(["index", "build", "--features", str(features), "--captions", str(captions), "--model",
                 str(trained[2]), "--out", str(tmp_path / "index"), "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "photo04.npy: 32-d region features" in err and "precomputed:64" in err
    assert not (tmp_path / "index").exists()


def test_features_and_photos_go_with_the_right_model(tmp_path, tiny_bert, trained, capsys):
    captions, features = make_set(tmp_path)
    # --features with the default photo model
    assert main(["index", "build", "--features", str(features), "--out", str(tmp_path / "i"), "--quiet"]) == 2
    assert "--features needs a model whose image backbone is precomputed:DIM" in capsys.readouterr().err
    # a features model with photos
    (tmp_path / "photos").mkdir()
    assert main(["eval", "--dataset", str(captions), "--images", str(tmp_path / "photos"), "--model",
                 str(trained[2])]) == 2
    assert "reads precomputed region features" in capsys.readouterr().err
    # neither, and both
    assert main(["train", "--dataset", str(captions), "--out", str(tmp_path / "o")]) == 2
    assert "--images DIR (photos) or --features DIR" in capsys.readouterr().err
    assert main(["eval", "--dataset", str(captions), "--features", str(features), "--images", str(tmp_path),
                 "--model", str(trained[2])]) == 2
    assert "one of them" in capsys.readouterr().err


def test_without_a_config_the_width_comes_from_the_features(tmp_path, tiny_bert):
    from alignsearch.cli import parse
    from alignsearch.models.cli import _features_config, config_from_args

    _, features = make_set(tmp_path)
    args = parse(["train", "--dataset", "x.csv", "--features", str(features), "--out", str(tmp_path / "o")])
    config = _features_config(args, config_from_args(args))
    assert (config.image_backbone.kind, config.image_backbone.feature_dim) == ("precomputed", DIM)


def test_feature_folder_finds_each_layout_by_the_captions_names(tmp_path):
    from alignsearch.models.precomputed import FeatureFolder, FeaturesError

    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "boxes").mkdir()
    np.save(folder / "a.jpg.npy", np.full((3, 4), 1, np.float32))  # the full name
    np.save(folder / "a.npy", np.full((3, 4), 2, np.float32))  # loses to the full name
    np.save(folder / "sub" / "b.npy", np.full((5, 4), 3, np.float16))  # the stem, in a subfolder
    np.save(folder / "boxes" / "c.npy", np.zeros((3, 4), np.float32))  # not features
    np.save(folder / "val.npy", np.arange(2 * 2 * 4, dtype=np.float32).reshape(2, 2, 4))
    (folder / "val.ids.txt").write_text("d.jpg\ne.jpg\n")
    source = FeatureFolder(folder)
    assert source.read(source.find("a.jpg"))[0, 0] == 1 and source.read(source.find("a"))[0, 0] == 2
    assert source.read(source.find("sub/b.jpg")).shape == (5, 4)
    assert source.read(source.find("sub/b.jpg")).dtype == np.float32
    assert source.read(source.find("e.jpg")).tolist() == [[8, 9, 10, 11], [12, 13, 14, 15]]
    assert source.find("c.jpg") is None and source.find("boxes/c") is None and source.find("val") is None
    assert source.find("../f/a.jpg") is not None and source.find("../x") is None
    assert source.names() == ["a", "a.jpg", "d.jpg", "e.jpg", "sub/b"]
    assert source.ids_for(["a.jpg", "sub/b.jpg", "z.jpg"]) == ["a", "a.jpg", "d.jpg", "e.jpg", "sub/b.jpg", "z.jpg"]
    refs, failures = source.resolve(["a.jpg", "z.jpg"], 4)
    assert refs[1] is None and failures == [("z.jpg", "no region features (z.jpg.npy or z.npy in the features folder)")]
    with pytest.raises(FeaturesError, match="a.jpg.npy: 4-d region features.*precomputed:8"):
        source.resolve(["a.jpg"], 8)
    (folder / "val.ids.txt").write_text("d.jpg\n")
    with pytest.raises(FeaturesError, match=r"val.npy: shape \(2, 2, 4\), expected 1 x R x D"):
        FeatureFolder(folder)


def test_index_add_reads_new_features_and_links_their_captions(trained, tmp_path, capsys):
    from alignsearch.indexer.index import Index

    captions, features, model_dir = trained
    first, later = tmp_path / "first", tmp_path / "later"
    first.mkdir()
    later.mkdir()
    for n, path in enumerate(sorted(features.glob("*.npy"))):
        (first if n < 8 else later).joinpath(path.name).write_bytes(path.read_bytes())
    out = tmp_path / "index"
    assert main(["index", "build", "--features", str(first), "--captions", str(captions), "--model", str(model_dir),
                 "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert Index(out).manifest["counts"] == {"images": 8, "captions": 24, "images_deleted": 0, "captions_deleted": 0}
    capsys.readouterr()
    assert main(["index", "add", str(out), "--features", str(later), "--captions", str(captions), "--model",
                 str(model_dir), "--quiet", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images_added"] == 4 and report["captions_added"] == 0 and report["captions_linked"] == 8
    index = Index(out)
    assert sorted(r[0] for r in index.conn.execute("SELECT id FROM images")) == _names()
    assert index.conn.execute("SELECT COUNT(*) FROM captions WHERE image_id IS NOT NULL").fetchone()[0] == 24
