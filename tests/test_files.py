"""Indexed photos are served as what was indexed: a regular file under the images root, never through a
symlink placed later (to a file outside the root, or to the index's manifest)."""

from __future__ import annotations

import os

import pytest

from alignsearch.service.files import NotServable, chunks, open_indexed, open_recorded


@pytest.fixture
def root(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.jpg").write_bytes(b"photo a")
    (images / "sub" / "b.jpg").write_bytes(b"photo b")
    (tmp_path / "secret.txt").write_text("outside the root")
    return images


def test_a_file_under_the_root_is_served(root):
    fh, info = open_indexed(root, "sub/b.jpg")
    assert b"".join(chunks(fh)) == b"photo b" and info.st_size == 7 and fh.closed


def test_a_photo_replaced_by_a_symlink_is_refused(root):
    (root / "a.jpg").unlink()
    (root / "a.jpg").symlink_to(root.parent / "secret.txt")
    with pytest.raises(NotServable):
        open_indexed(root, "a.jpg")


def test_a_folder_replaced_by_a_symlink_is_refused(root, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "b.jpg").write_text("outside the root")
    (root / "sub" / "b.jpg").unlink()
    (root / "sub").rmdir()
    (root / "sub").symlink_to(outside)
    with pytest.raises(NotServable):
        open_indexed(root, "sub/b.jpg")


@pytest.mark.parametrize("rel", ["../secret.txt", "/etc/passwd", "sub/../../secret.txt", "", "sub"])
def test_paths_out_of_the_root_and_folders_are_refused(root, rel):
    with pytest.raises(NotServable):
        open_indexed(root, rel)


def test_a_fifo_is_refused_without_blocking(root):
    os.mkfifo(root / "pipe.jpg")
    with pytest.raises(NotServable):
        open_indexed(root, "pipe.jpg")


def test_a_symlinked_root_is_the_users_choice(root, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(root)
    fh, _ = open_indexed(link, "a.jpg")
    assert b"".join(chunks(fh)) == b"photo a"


def test_a_photo_added_from_another_folder_is_served_by_its_absolute_record(tmp_path):
    other = tmp_path / "more"
    other.mkdir()
    (other / "late.jpg").write_bytes(b"late photo")
    fh, info = open_recorded(tmp_path / "root-elsewhere", str(other / "late.jpg"))
    assert b"".join(chunks(fh)) == b"late photo" and info.st_size == 10
    (other / "late.jpg").unlink()
    (other / "late.jpg").symlink_to("/etc/passwd")  # replaced by a symlink later: refused all the same
    with pytest.raises(NotServable):
        open_recorded(tmp_path / "root-elsewhere", str(other / "late.jpg"))
