"""How the build reads photos: a large JPEG decoded at a reduced scale (close to the full decode, its full size
reported), everything else exactly as a full decode; iPhone photos with pillow-heif; what it cannot read, said."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from alignsearch.indexer.reader import DecodePool, scan_images, unread_note
from alignsearch.models.preprocess import (IMAGE_EXTENSIONS, ImageDecodeError, ImagePreprocessor, load_image,
                                           load_image_sized)

from conftest import _sample_dir

PRE = ImagePreprocessor(224, (0.5,) * 3, (0.5,) * 3)
ORIENTATION = 0x0112


def _phone_photo(path: Path, size: tuple[int, int], orientation: int | None = None, fmt: str = "JPEG") -> Path:
    """A real photo (scikit-image's cat) scaled up to ``size`` and saved, with an EXIF orientation if given."""
    image = Image.open(_sample_dir() / "chelsea.png").convert("RGB").resize(size, Image.BICUBIC)
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    image.save(path, fmt, quality=95, exif=exif.tobytes()) if fmt == "JPEG" else image.save(path, fmt)
    return path


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_a_large_jpeg_decodes_at_a_reduced_scale_close_to_the_full_decode(tmp_path):
    path = _phone_photo(tmp_path / "big.jpg", (1800, 1200))
    image, full_size = load_image_sized(path, min_side=448)
    assert full_size == (1800, 1200)
    assert image.size == (900, 600)  # 1/2: the largest scale that keeps both sides >= 448
    pixels, size = PRE.load_file(path)
    assert size == (1800, 1200) and pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    full = PRE.resize(load_image(path))
    assert 0 < _mean_abs_diff(pixels, full) < 1.0  # not the same decode, but within a level on average


def test_the_full_size_follows_the_exif_orientation(tmp_path):
    path = _phone_photo(tmp_path / "rotated.jpg", (1800, 1200), orientation=6)  # stored landscape, shown portrait
    image, full_size = load_image_sized(path, min_side=448)
    assert full_size == (1200, 1800) and image.size == (600, 900)
    assert load_image(path).size == (1200, 1800)
    pixels, size = PRE.load_file(path)
    assert size == (1200, 1800)
    assert _mean_abs_diff(pixels, PRE.resize(load_image(path))) < 1.0  # rotated the same way


@pytest.mark.parametrize("name, size, fmt", [("small.jpg", (600, 400), "JPEG"), ("big.png", (1800, 1200), "PNG")])
def test_small_jpegs_and_other_formats_get_exactly_the_full_decode(tmp_path, name, size, fmt):
    """A JPEG with a side under twice the decode floor, and any non-JPEG, have no reduced decode."""
    path = _phone_photo(tmp_path / name, size, fmt=fmt)
    pixels, got = PRE.load_file(path)
    assert got == size
    assert np.array_equal(pixels, PRE.resize(load_image(path)))


def test_the_decode_processes_report_the_full_size(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    _phone_photo(folder / "a.jpg", (1800, 1200), orientation=6)
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    pool = DecodePool(1, PRE)
    try:
        [good, bad] = next(pool.batches(folder, [["a.jpg", "b.jpg"]]))
    finally:
        pool.close()
    assert (good.width, good.height, good.error) == (1200, 1800, None)
    assert np.array_equal(good.array, PRE.load_file(folder / "a.jpg")[0])
    assert bad.array is None and bad.error


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    path = _phone_photo(tmp_path / "big.jpg", (1800, 1200))
    with pytest.raises(ImageDecodeError, match="pixel limit"):
        load_image_sized(path, max_pixels=1800 * 1200 - 1, min_side=448)


def test_scan_counts_the_photos_it_cannot_read(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    _phone_photo(folder / "a.jpg", (64, 48))
    for name in ("b.dng", "sub/c.DNG", "sub/d.arw", "notes.txt", ".hidden.dng"):
        (folder / name).write_bytes(b"x")
    files, unread = scan_images(folder)
    assert files == ["a.jpg"] and unread == {".dng": 2, ".arw": 1}
    assert unread_note(unread) == "not indexed: 1 .arw, 2 .dng files (camera RAW: convert them to JPEG first)"
    unread[".heic"] = 1
    assert unread_note(unread).endswith("JPEG first); 1 .heic file (pip install 'alignsearch[heic]' to read them)")
    assert scan_images(folder / "sub")[1] == {".dng": 1, ".arw": 1}  # a subfolder scanned on its own
    assert unread_note(Counter()) is None


def test_an_iphone_photo_is_read_when_pillow_heif_is_installed(tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif", reason="HEIC needs pillow-heif (pip install 'alignsearch[heic]')")
    folder = tmp_path / "images"
    folder.mkdir()
    jpeg = _phone_photo(folder / "a.jpg", (300, 200))
    pillow_heif.from_pillow(Image.open(jpeg)).save(folder / "IMG_0001.HEIC", quality=90)
    assert ".heic" in IMAGE_EXTENSIONS
    assert scan_images(folder) == (["IMG_0001.HEIC", "a.jpg"], Counter())
    pixels, size = PRE.load_file(folder / "IMG_0001.HEIC")
    assert size == (300, 200)
    assert _mean_abs_diff(pixels, PRE.load_file(jpeg)[0]) < 4.0  # the same photo through a lossy codec


def _encoded(fmt: str) -> bytes:
    """A real photo (1000 x 700, so the JPEG is decoded at a reduced scale) in ``fmt``."""
    image = Image.open(_sample_dir() / "chelsea.png").convert("RGB").resize((1000, 700), Image.BICUBIC)
    buf = io.BytesIO()
    if fmt == "HEIF":
        pytest.importorskip("pillow_heif").from_pillow(image).save(buf, quality=60)
    else:
        image.save(buf, fmt, quality=80)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "HEIF"])
def test_a_damaged_photo_decodes_or_says_why_and_nothing_else(fmt):
    """Fuzz: random bytes overwritten and the file cut anywhere; the build's reader either decodes the photo or
    raises ImageDecodeError (which the build reports as a skipped item), never another exception."""
    data = _encoded(fmt)

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=32),
           st.integers(1, len(data)))
    def check(edits: list[tuple[int, int]], keep: int) -> None:
        damaged = bytearray(data)
        for at, value in edits:
            damaged[at] = value
        try:
            pixels, _ = PRE.load_file(bytes(damaged[:keep]))
        except ImageDecodeError:
            return
        assert pixels.shape == (224, 224, 3)

    check()
