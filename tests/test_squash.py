"""``bench.squash``: the two copies of a photo (true aspect, squashed square) against different photos."""

from __future__ import annotations

from PIL import Image

from conftest import sample_files
from alignsearch.bench import squash


def test_squashed_copies_are_near_their_photo_and_far_from_others(photos, tmp_path):
    true, squashed = tmp_path / "true", tmp_path / "squashed"
    (true / "images").mkdir(parents=True)
    (squashed / "images").mkdir(parents=True)
    for path in sample_files(photos[0])[:6]:
        image = Image.open(path).convert("RGB")
        image.thumbnail((200, 200))
        image.save(true / "images" / f"{path.stem}.jpg", quality=90)
        image.resize((224, 224)).save(squashed / "images" / f"{path.stem}.jpg", quality=90)
    (squashed / "images" / "only-here.jpg").write_bytes(b"")  # in one set only: not compared
    report = squash.report(None, true, squashed)
    assert report["photos"] == 6
    pooled = report["pooled_cosine"]
    assert pooled["same_photo_mean"] > 0.8 > pooled["different_photos_mean"]
    assert report["region_cosine"]["same_photo_mean"] > report["region_cosine"]["different_photos_mean"]
    assert report["squashed_finds_its_true_aspect_copy_r1"] == 100.0
