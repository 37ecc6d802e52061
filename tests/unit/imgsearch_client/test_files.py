"""Tests of finding image files under command-line paths."""

import pytest

from imgsearch_client.files import find_images


def test_folder_yields_images_sorted_recursively(tmp_path):
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "a.PNG").write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.webp").write_bytes(b"x")

    found = [path.relative_to(tmp_path).as_posix() for path in find_images([tmp_path])]

    assert found == ["a.PNG", "b.jpg", "sub/c.webp"]


def test_named_file_is_taken_whatever_its_suffix(tmp_path):
    named = tmp_path / "picture.data"
    named.write_bytes(b"x")

    assert list(find_images([named])) == [named]


def test_missing_path_raises_naming_it(tmp_path):
    missing = tmp_path / "nope"

    with pytest.raises(FileNotFoundError, match="nope"):
        list(find_images([missing]))
