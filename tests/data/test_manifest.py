"""Building the manifest: validation of every image, duplicates, layouts."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import ImageFile

from catdog.data.manifest import IMAGE_SUFFIXES, build_manifest
from catdog.data.records import Manifest, load_manifest
from catdog.errors import DataError


def _skipped(manifest: Manifest) -> dict[str, str]:
    return {entry.path: entry.reason for entry in manifest.skipped}


def test_suffixes() -> None:
    assert {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"} == IMAGE_SUFFIXES


def test_clean_dataset(dataset_factory: Callable[..., Path]) -> None:
    root = dataset_factory(n=3)
    manifest = build_manifest(root.parent)
    assert manifest.root == str(root.resolve())
    assert manifest.layout == "train_validation"
    assert manifest.classes == ("cats", "dogs")
    assert manifest.skipped == ()
    assert len(manifest.images) == 12
    paths = [entry.path for entry in manifest.images]
    assert paths == sorted(paths)
    first = manifest.images[0]
    assert first.path == "train/cats/cats.0.jpg"
    assert (first.label, first.class_name, first.source_split, first.split) == (
        0,
        "cats",
        "train",
        None,
    )
    assert {(e.source_split, e.class_name, e.label) for e in manifest.images} == {
        ("train", "cats", 0),
        ("train", "dogs", 1),
        ("validation", "cats", 0),
        ("validation", "dogs", 1),
    }
    assert len({entry.sha256 for entry in manifest.images}) == 12
    # Same content, same manifest (apart from the root).
    assert build_manifest(root, workers=1).content_hash() == manifest.content_hash()


def test_broken_files_are_skipped_with_reasons(
    dataset_factory: Callable[..., Path], image_writer: Callable[..., Path]
) -> None:
    root = dataset_factory(n=2)
    cats = root / "train/cats"
    data = image_writer(cats / "whole.jpg", size=(120, 90)).read_bytes()
    (cats / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (cats / "empty.jpg").write_bytes(b"")
    (cats / "text.jpg").write_text("this is not a picture\n")
    png = image_writer(cats / "whole.png", fmt="PNG", size=(120, 90)).read_bytes()
    (cats / "cut.png").write_bytes(png[: len(png) // 2])
    (cats / "notes.txt").write_text("stray")
    (cats / "Makefile").write_text("stray")
    (cats / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (cats / "._whole.jpg").write_bytes(b"\0\5\26\7")
    (cats / "Thumbs.db").write_bytes(b"\xd0\xcf")
    (root / "vectorize.py").write_text("print('stray beside the splits')\n")

    manifest = build_manifest(root)
    skipped = _skipped(manifest)
    assert skipped.pop("train/cats/truncated.jpg").startswith("truncated or corrupt image: ")
    assert skipped.pop("train/cats/cut.png").startswith("truncated or corrupt image: ")
    assert skipped == {
        "train/cats/empty.jpg": "empty file",
        "train/cats/text.jpg": "not an image: cannot identify image file",
        "train/cats/notes.txt": "not an image file (suffix .txt)",
        "train/cats/Makefile": "not an image file (no suffix)",
    }
    names = {entry.path for entry in manifest.images}
    assert {"train/cats/whole.jpg", "train/cats/whole.png"} <= names
    assert len(manifest.images) == 10
    assert not any("0x" in entry.reason for entry in manifest.skipped)
    # The global Pillow flag is left as the caller had it.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_detection_does_not_depend_on_the_global_flag(
    dataset_factory: Callable[..., Path],
    image_writer: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = dataset_factory(n=1)
    data = image_writer(root / "x.jpg", size=(400, 300)).read_bytes()
    (root / "x.jpg").unlink()
    (root / "train/cats/cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    manifest = build_manifest(root)
    assert "train/cats/cut.jpg" in _skipped(manifest)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


@pytest.mark.parametrize(
    ("name", "fmt", "mode"),
    [
        ("gray.jpg", "JPEG", "L"),
        ("cmyk.jpg", "JPEG", "CMYK"),
        ("rgba.png", "PNG", "RGBA"),
        ("gray16.png", "PNG", "I;16"),
        ("palette.gif", "GIF", "P"),
        ("plain.bmp", "BMP", "RGB"),
        ("photo.webp", "WEBP", "RGB"),
        ("upper.JPEG", "JPEG", "RGB"),
    ],
)
def test_other_formats_and_modes_are_accepted(
    dataset_factory: Callable[..., Path],
    image_writer: Callable[..., Path],
    name: str,
    fmt: str,
    mode: str,
) -> None:
    root = dataset_factory(n=1)
    image_writer(root / "validation/dogs" / name, fmt=fmt, mode=mode)
    manifest = build_manifest(root)
    assert manifest.skipped == ()
    assert f"validation/dogs/{name}" in {entry.path for entry in manifest.images}


def test_three_classes_three_splits(dataset_factory: Callable[..., Path]) -> None:
    root = dataset_factory(
        layout="train_validation_test",
        classes=("bird", "cat", "dog"),
        n={"train": 3, "validation": 2, "test": 1},
    )
    manifest = build_manifest(root)
    assert manifest.layout == "train_validation_test"
    assert manifest.classes == ("bird", "cat", "dog")
    counts: dict[tuple[str | None, int], int] = {}
    for entry in manifest.images:
        key = (entry.source_split, entry.label)
        counts[key] = counts.get(key, 0) + 1
    assert counts == {
        (split, label): n
        for split, n in (("train", 3), ("validation", 2), ("test", 1))
        for label in range(3)
    }


def test_val_folder_maps_to_validation(dataset_factory: Callable[..., Path]) -> None:
    manifest = build_manifest(dataset_factory(layout="train_val", n=1))
    assert {entry.source_split for entry in manifest.images} == {"train", "validation"}
    assert "val/cats/cats.1.jpg" in {entry.path for entry in manifest.images}


def test_single_root_with_nested_folders(
    dataset_factory: Callable[..., Path], image_writer: Callable[..., Path]
) -> None:
    root = dataset_factory(layout="single_root", classes=("ants", "bees"), n=2)
    image_writer(root / "bees/more/deep.png", fmt="PNG")
    (root / "README.md").write_text("flat dataset")
    manifest = build_manifest(root)
    assert manifest.layout == "single_root"
    assert manifest.classes == ("ants", "bees")
    assert [entry.path for entry in manifest.images] == [
        "ants/ants.0.jpg",
        "ants/ants.1.jpg",
        "bees/bees.0.jpg",
        "bees/bees.1.jpg",
        "bees/more/deep.png",
    ]
    assert {entry.source_split for entry in manifest.images} == {None}
    assert [entry.label for entry in manifest.images] == [0, 0, 1, 1, 1]


def test_duplicates_are_kept_once_in_the_earliest_split(
    dataset_factory: Callable[..., Path],
) -> None:
    root = dataset_factory(layout="train_validation_test", n=3)
    # The same picture in validation and train (under a different name), and in test.
    shutil.copy(root / "train/cats/cats.1.jpg", root / "validation/cats/copy.jpg")
    shutil.copy(root / "train/cats/cats.1.jpg", root / "test/cats/again.jpg")
    # Validation and test share one picture that train does not have.
    shutil.copy(root / "validation/dogs/dogs.3.jpg", root / "test/dogs/from-val.jpg")
    # And a copy inside the same folder.
    shutil.copy(root / "train/dogs/dogs.2.jpg", root / "train/dogs/dogs.2 (copy).jpg")

    manifest = build_manifest(root)
    assert _skipped(manifest) == {
        "validation/cats/copy.jpg": "duplicate of train/cats/cats.1.jpg",
        "test/cats/again.jpg": "duplicate of train/cats/cats.1.jpg",
        "test/dogs/from-val.jpg": "duplicate of validation/dogs/dogs.3.jpg",
        "train/dogs/dogs.2.jpg": "duplicate of train/dogs/dogs.2 (copy).jpg",
    }
    assert len(manifest.images) == 18
    assert len({entry.sha256 for entry in manifest.images}) == 18
    by_split: dict[str | None, int] = {}
    for entry in manifest.images:
        by_split[entry.source_split] = by_split.get(entry.source_split, 0) + 1
    assert by_split == {"train": 6, "validation": 6, "test": 6}


def test_no_dataset(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty has no class folders"):
        build_manifest(tmp_path / "empty")


def test_a_saved_manifest_reads_back_equal_and_its_hash_is_its_content(
    dataset_factory: Callable[..., Path], tmp_path: Path
) -> None:
    manifest = build_manifest(dataset_factory(n=3).parent)
    path = tmp_path / "manifest.json"
    assert manifest.save(path) == manifest.content_hash()
    assert Manifest.load(path) == manifest
    moved = replace(manifest, root="/elsewhere")
    assert moved.save(tmp_path / "moved.json") == manifest.content_hash()  # not where, what

    shared = load_manifest(path)
    assert shared == manifest and load_manifest(path) is shared  # one read per process
    fewer = manifest.with_images(manifest.images[1:])
    fewer.save(path)  # written anew: read anew
    assert load_manifest(path) == fewer
