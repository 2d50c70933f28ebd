"""`alignsearch train` / `eval` on real images: outputs, resume, and clear errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import demo_captions, sample_files
from alignsearch.models import BackboneConfig, HeadConfig, ModelConfig, load_model
from alignsearch.cli import main


@pytest.fixture()
def small_set(tmp_path, photos) -> tuple[Path, Path]:
    """The 16 sample photos (12 train, 4 test) plus one corrupt file, with a Karpathy JSON of their captions."""
    by_image: dict[str, list[str]] = {}
    for row in demo_captions():
        by_image.setdefault(row["image"], []).append(row["caption"])
    images = tmp_path / "images"
    images.mkdir()
    items = []
    for n, path in enumerate(sample_files(photos[0])):
        shutil.copy(path, images / path.name)
        items.append({"filename": path.name, "split": "test" if n % 4 == 3 else "train",
                      "sentences": [{"raw": c} for c in by_image[path.name]]})
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    items.append({"filename": "broken.jpg", "split": "train", "sentences": [{"raw": "nothing to see"}]})
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"images": items}))
    return path, images


def _tiny_config(tmp_path, tiny_vit, tiny_bert) -> Path:
    cfg = ModelConfig(
        image_backbone=BackboneConfig("hf-vision", tiny_vit, image_size=32),
        text_backbone=BackboneConfig("hf-text", tiny_bert),
        embed_dim=16, image_head=HeadConfig(layers=1, heads=2), text_head=HeadConfig(layers=1, heads=2),
    )
    cfg.save(tmp_path / "config.json")
    return tmp_path / "config.json"


def test_train_saves_best_model_skips_corrupt_image_and_resumes(tmp_path, small_set, tiny_vit, tiny_bert, capsys):
    dataset, images = small_set
    config = _tiny_config(tmp_path, tiny_vit, tiny_bert)
    out = tmp_path / "run"
    args = ["train", "--dataset", str(dataset), "--images", str(images), "--out", str(out), "--config", str(config),
            "--batch-size", "8", "--val-size", "5", "--candidates", "3", "--cache-dir", str(tmp_path / "cache")]
    assert main(args + ["--epochs", "1"]) == 0
    summary = json.loads((out / "training.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1]
    assert any(p.endswith("broken.jpg") for p in summary["skipped_images"])
    assert main(args + ["--epochs", "2"]) == 2  # a checkpoint is never overwritten without --resume
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--epochs", "2", "--resume"]) == 0  # resumes from the checkpoint: only epoch 2 runs
    summary = json.loads((out / "training.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    model = load_model(out / "model", device="cpu")
    assert model.fingerprint == summary["fingerprint"]
    assert str(model.config.local_weight) in summary["local_weight_sweep"]

    report = tmp_path / "eval.json"
    assert main(["eval", "--dataset", str(dataset), "--images", str(images), "--model", str(out / "model"),
                 "--candidates", "3", "--json", str(report)]) == 0
    results = json.loads(report.read_text())
    assert set(results) >= {"global", "exhaustive", "two-stage"}
    for mode in ("global", "exhaustive", "two-stage"):
        row = results[mode]
        assert set(row) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}
        assert row["rsum"] == pytest.approx(sum(v for k, v in row.items() if k != "rsum"), abs=0.1)
        assert 0 <= row["i2t_r1"] <= row["i2t_r5"] <= row["i2t_r10"] <= 100
    test = [i for i in json.loads(dataset.read_text())["images"] if i["split"] == "test"]
    assert results["meta"]["images"] == len(test) == 4
    assert results["meta"]["captions"] == sum(len(i["sentences"]) for i in test)
    assert "two-stage" in capsys.readouterr().out


def test_eval_leaves_out_and_reports_captions_whose_image_cannot_be_decoded(small_set, tmp_path, capsys):
    dataset, images = small_set
    data = json.loads(dataset.read_text())
    for item in data["images"]:
        if item["filename"] == "broken.jpg":
            item["split"] = "test"  # an image of the evaluated split that no decoder reads
    dataset.write_text(json.dumps(data))
    report = tmp_path / "eval.json"
    assert main(["eval", "--dataset", str(dataset), "--images", str(images), "--candidates", "3", "--device", "cpu",
                 "--json", str(report), "--quiet"]) == 0
    meta = json.loads(report.read_text())["meta"]
    test = [i for i in data["images"] if i["split"] == "test" and i["filename"] != "broken.jpg"]
    assert meta["images"] == len(test) and meta["captions"] == sum(len(i["sentences"]) for i in test)
    assert meta["captions_dropped"] == 1
    out = capsys.readouterr().out
    assert "broken.jpg" in out and "1 caption(s) whose image was skipped" in out


def test_train_missing_images_folder_is_a_clear_error(tmp_path, small_set, capsys):
    dataset, _ = small_set
    code = main(["train", "--dataset", str(dataset), "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "images folder not found" in capsys.readouterr().err


def test_malformed_json_is_a_clear_error(tmp_path, small_set, capsys):
    _, images = small_set
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [ {"filename": ')
    code = main(["eval", "--dataset", str(bad), "--images", str(images)])
    assert code == 2
    err = capsys.readouterr().err
    assert "malformed JSON" in err and "Traceback" not in err


def test_csv_dataset_is_read(tmp_path):
    from alignsearch.models.data import load_dataset, select_split

    path = tmp_path / "c.csv"
    path.write_text("image,caption\na.jpg,a dog\na.jpg,a brown dog\nb.jpg,a cat\n")
    records = load_dataset(path)
    assert [(r.filename, r.captions) for r in records] == [("a.jpg", ["a dog", "a brown dog"]), ("b.jpg", ["a cat"])]
    assert select_split(records, "train", val_size=0) == records


def test_a_coco_karpathy_file_names_images_under_their_filepath(tmp_path):
    """COCO's Karpathy file keeps photos in train2014/ and val2014/ ("filepath"); restval trains."""
    from alignsearch.models.data import load_dataset, select_split

    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_1.jpg", "split": "restval",
         "sentences": [{"raw": "A man rides a horse."}]},
        {"filepath": "val2014", "filename": "COCO_val2014_2.jpg", "split": "val",
         "sentences": [{"raw": "Two cups of coffee."}]},
        {"filename": "flat.jpg", "split": "train", "sentences": [{"raw": "A dog."}]}]}))
    records = load_dataset(path)
    assert [r.filename for r in records] == ["val2014/COCO_val2014_1.jpg", "val2014/COCO_val2014_2.jpg", "flat.jpg"]
    assert [r.filename for r in select_split(records, "train")] == ["val2014/COCO_val2014_1.jpg", "flat.jpg"]


def test_fine_tuning_top_layers_updates_the_backbone(tmp_path, small_set, tiny_vit, tiny_bert):
    import torch

    dataset, images = small_set
    config = _tiny_config(tmp_path, tiny_vit, tiny_bert)
    out = tmp_path / "ft"
    assert main(["train", "--dataset", str(dataset), "--images", str(images), "--out", str(out),
                 "--config", str(config), "--epochs", "1", "--batch-size", "8", "--val-size", "5",
                 "--candidates", "3", "--train-text-layers", "1", "--no-tune-weight"]) == 0
    tuned = load_model(out / "model", device="cpu")
    from transformers import AutoModel

    original = AutoModel.from_pretrained(tiny_bert)
    name = "encoder.layer.1.output.dense.weight"
    assert not torch.equal(tuned.text_backbone.net.state_dict()[name], original.state_dict()[name])
    name0 = "encoder.layer.0.output.dense.weight"  # below the fine-tuned layers: frozen
    assert torch.equal(tuned.text_backbone.net.state_dict()[name0], original.state_dict()[name0])


def test_trainable_image_backbone_computes_augmented_views_live(tmp_path, small_set, tiny_vit, tiny_bert):
    """With top image blocks trainable, every view (plain and augmented) follows the backbone as it trains:
    none is a cache of the features the untrained backbone gave."""
    import torch

    from alignsearch.models.train import TrainOptions, prepare_run

    dataset, images = small_set
    config = ModelConfig.load(_tiny_config(tmp_path, tiny_vit, tiny_bert))
    config.image_backbone.trainable_layers = 1
    options = TrainOptions(dataset=dataset, images=images, out=tmp_path / "run", epochs=1, batch_size=4, val_size=4,
                           augment_views=2, cache_dir=tmp_path / "cache", device="cpu", progress=False)
    run = prepare_run(options, config)
    assert len(run.views) == 3 and run.views[0] is run.images
    rows = run.train_pairs.image_rows[:4]
    before = [view.batch(rows, "cpu").tokens.detach().clone() for view in run.views]
    assert not torch.equal(before[0], before[1])  # an augmented view is another crop, not the plain image
    trainable = [p for p in run.model.image_backbone.parameters() if p.requires_grad]
    assert trainable, "--train-image-layers 1 must leave the top block trainable"
    with torch.no_grad():
        for p in trainable:
            p.add_(0.5)
    after = [view.batch(rows, "cpu").tokens.detach() for view in run.views]
    for v, (old, new) in enumerate(zip(before, after)):
        assert not torch.allclose(old, new), f"view {v} did not follow the backbone's weights"


def test_mosaic_loss_builds_training_mosaics_and_trains_the_image_head(tmp_path, small_set, tiny_vit, tiny_bert):
    import torch

    from alignsearch.models.config import ModelConfig as Config
    from alignsearch.models.train import TrainOptions, mosaic_step_loss, prepare_run

    dataset, images = small_set
    config = Config.load(_tiny_config(tmp_path, tiny_vit, tiny_bert))
    options = TrainOptions(dataset=dataset, images=images, out=tmp_path / "run", epochs=1, batch_size=8,
                           augment_views=0, mosaic_loss_weight=1.0, mosaics=6, cache_dir=None, progress=False,
                           workers=1)
    run = prepare_run(options, config)
    assert run.mosaic is not None and len(run.mosaic.train_plan) == 6
    assert run.mosaic.train.tokens.shape[0] == 6
    assert run.mosaic.val is None  # 2 validation photos: too few for a mosaic, so no measure
    run.model.train()
    loss = mosaic_step_loss(run, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in run.model.image_head.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_an_interrupted_run_resumed_ends_with_the_same_model(tmp_path, small_set, tiny_vit, tiny_bert, monkeypatch,
                                                               capsys):
    """Ctrl-C during epoch 2 of 3, then --resume: the same weights and history as a run never stopped (the
    checkpoint carries the optimiser and the random state that dropout draws from)."""
    from safetensors.torch import load_file

    from alignsearch.models import train as train_module

    dataset, images = small_set
    config = _tiny_config(tmp_path, tiny_vit, tiny_bert)

    def args(out: Path) -> list[str]:
        return ["train", "--dataset", str(dataset), "--images", str(images), "--out", str(out), "--config",
                str(config), "--batch-size", "4", "--val-size", "5", "--candidates", "3", "--epochs", "3",
                "--cache-dir", str(tmp_path / "cache"), "--dropout", "0.3", "--augment-views", "1"]

    assert main(args(tmp_path / "clean")) == 0
    real_epoch = train_module.train_epoch

    def interrupted(run, epoch):
        if epoch == 1:
            real_epoch(run, epoch)  # half-way through: the epoch's work is lost, its checkpoint never written
            raise KeyboardInterrupt
        return real_epoch(run, epoch)

    monkeypatch.setattr(train_module, "train_epoch", interrupted)
    assert main(args(tmp_path / "stopped")) == 130
    assert "1 of 3 epochs are saved" in capsys.readouterr().err
    monkeypatch.setattr(train_module, "train_epoch", real_epoch)
    assert main(args(tmp_path / "stopped") + ["--lr", "1e-3", "--resume"]) == 2  # other settings: refused, named
    assert "lr" in capsys.readouterr().err
    assert main(args(tmp_path / "stopped") + ["--resume"]) == 0

    clean = load_file(str(tmp_path / "clean" / "model" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "stopped" / "model" / "model.safetensors"))
    assert clean.keys() == resumed.keys()
    for name in clean:
        assert torch.equal(clean[name], resumed[name]), name
    history = [json.loads((tmp_path / run / "training.json").read_text())["history"] for run in ("clean", "stopped")]
    drop = ("seconds", "peak_rss_mb")
    assert [{k: v for k, v in h.items() if k not in drop} for h in history[0]] == \
        [{k: v for k, v in h.items() if k not in drop} for h in history[1]]
    assert all(h["peak_rss_mb"] > 0 for h in history[1])
