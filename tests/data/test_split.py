"""Deterministic, stratified splitting of a manifest."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from catdog.data.manifest import build_manifest
from catdog.data.records import SPLITS, ImageEntry, Manifest
from catdog.data.split import split_manifest
from catdog.errors import DataError


def synthetic(layout: str, per_folder: dict[str | None, int], classes=("cats", "dogs")) -> Manifest:
    """A manifest without files: split_manifest only looks at the entries."""
    images = []
    for source, n in per_folder.items():
        for label, class_name in enumerate(classes):
            for index in range(n):
                path = (
                    f"{source}/{class_name}/{index}.jpg" if source else f"{class_name}/{index}.jpg"
                )
                images.append(
                    ImageEntry(
                        path=path,
                        label=label,
                        class_name=class_name,
                        sha256=hashlib.sha256(path.encode()).hexdigest(),
                        source_split=source,
                    )
                )
    return Manifest(
        root="/data/x",
        layout=layout,
        classes=tuple(classes),
        images=tuple(sorted(images, key=lambda e: e.path)),
    )


def counts(manifest: Manifest) -> dict[tuple[str | None, str], int]:
    return dict(Counter((entry.split, entry.class_name) for entry in manifest.images))


def assignment(manifest: Manifest) -> dict[str, str | None]:
    return {entry.path: entry.split for entry in manifest.images}


def test_train_validation_like_the_real_data() -> None:
    manifest = synthetic("train_validation", {"train": 100, "validation": 50})
    result = split_manifest(manifest, seed=1337)
    assert counts(result) == {
        ("train", "cats"): 100,
        ("train", "dogs"): 100,
        ("validation", "cats"): 40,
        ("validation", "dogs"): 40,
        ("test", "cats"): 10,
        ("test", "dogs"): 10,
    }
    for entry in result.images:
        # train stays train; test comes only out of validation/.
        if entry.source_split == "train":
            assert entry.split == "train"
        else:
            assert entry.split in ("validation", "test")
    assert [entry.path for entry in result.images] == sorted(e.path for e in result.images)
    assert result.split_settings == {
        "seed": 1337,
        "test_fraction": 0.2,
        "flat_fractions": [0.7, 0.15, 0.15],
        "max_images_per_class": None,
    }
    assert manifest.images[0].split is None  # the input is left untouched


def test_determinism() -> None:
    manifest = synthetic("single_root", {None: 40})
    first = split_manifest(manifest, seed=7)
    again = split_manifest(manifest, seed=7)
    assert first == again

    shuffled = manifest.with_images(reversed(manifest.images))
    assert split_manifest(shuffled, seed=7) == first

    moved = replace(manifest, root="/somewhere/else")
    assert split_manifest(moved, seed=7).content_hash() == first.content_hash()

    other = split_manifest(manifest, seed=8)
    assert assignment(other) != assignment(first)
    assert counts(other) == counts(first)  # different files, same stratified sizes


def test_adding_an_image_moves_few_others() -> None:
    # Per-file ordering keys: one new image shifts at most a boundary, not the whole split.
    manifest = synthetic("train_validation", {"train": 10, "validation": 100})
    before = assignment(split_manifest(manifest, seed=1))
    extra = ImageEntry("validation/cats/new.jpg", 0, "cats", "f" * 64, "validation")
    after = assignment(split_manifest(manifest.with_images([*manifest.images, extra]), seed=1))
    changed = [path for path in before if before[path] != after[path]]
    assert len(changed) <= 1


def test_single_root_stratified() -> None:
    manifest = synthetic("single_root", {None: 100}, classes=("a", "b", "c"))
    result = split_manifest(manifest, seed=3, flat_fractions=(0.6, 0.25, 0.15))
    for class_name in ("a", "b", "c"):
        assert counts(result)[("train", class_name)] == 60
        assert counts(result)[("validation", class_name)] == 25
        assert counts(result)[("test", class_name)] == 15
    assert result.split_settings["flat_fractions"] == [0.6, 0.25, 0.15]


def test_train_validation_test_keeps_the_folders() -> None:
    manifest = synthetic("train_validation_test", {"train": 5, "validation": 3, "test": 2})
    result = split_manifest(manifest, seed=0)
    assert all(entry.split == entry.source_split for entry in result.images)
    assert counts(result)[("test", "dogs")] == 2


def test_no_file_in_two_splits(dataset_factory: Callable[..., Path]) -> None:
    root = dataset_factory(layout="train_validation", n={"train": 4, "validation": 5})
    result = split_manifest(build_manifest(root), seed=11)
    seen: dict[str, str | None] = {}
    for entry in result.images:
        assert seen.setdefault(entry.sha256, entry.split) == entry.split
    assert len(seen) == len(result.images) == 18
    assert {entry.split for entry in result.images} == set(SPLITS)


def test_small_classes_still_fill_every_split() -> None:
    # round(3 * 0.15) == 0, yet every split gets an image; train keeps the rest.
    flat = split_manifest(synthetic("single_root", {None: 3}), seed=0)
    assert set(counts(flat).values()) == {1}
    # round(2 * 0.2) == 0 test images: one is held out anyway, one stays in validation.
    result = split_manifest(synthetic("train_validation", {"train": 1, "validation": 2}), seed=0)
    assert counts(result)[("test", "cats")] == 1
    assert counts(result)[("validation", "cats")] == 1


def test_too_few_images_for_every_split() -> None:
    with pytest.raises(DataError, match=r"class 'cats' has 2 usable image\(s\).*at least 3"):
        split_manifest(synthetic("single_root", {None: 2}), seed=0)
    one = synthetic("train_validation", {"train": 3, "validation": 1})
    with pytest.raises(DataError, match=r"class 'cats' has 1 usable image\(s\) in validation/"):
        split_manifest(one, seed=0)
    manifest = synthetic("train_validation_test", {"train": 3, "validation": 3, "test": 1})
    no_test_dog = manifest.with_images(
        e for e in manifest.images if not (e.source_split == "test" and e.class_name == "dogs")
    )
    with pytest.raises(DataError, match=r"class 'dogs' has no usable images in the test split"):
        split_manifest(no_test_dog, seed=0)


def test_max_images_per_class() -> None:
    manifest = synthetic("train_validation", {"train": 20, "validation": 20})
    full = split_manifest(manifest, seed=5)
    capped = split_manifest(manifest, seed=5, max_images_per_class=3)
    assert set(counts(capped).values()) == {3}
    assert len(capped.images) == 18
    assert capped.skipped == manifest.skipped  # dropped, not skipped
    assert capped.split_settings["max_images_per_class"] == 3
    # The capped set is a subset of the full split, with the same assignment.
    assert all(assignment(full)[entry.path] == entry.split for entry in capped.images)
    # A cap larger than a split takes all of it.
    assert counts(split_manifest(manifest, seed=5, max_images_per_class=100)) == counts(full)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"test_fraction": 0.0},
        {"test_fraction": 1.0},
        {"flat_fractions": (0.5, 0.5, 0.0)},
        {"flat_fractions": (0.7, 0.2, 0.2)},
        {"flat_fractions": (0.7, 0.3)},
        {"max_images_per_class": 0},
    ],
)
def test_invalid_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        split_manifest(synthetic("single_root", {None: 10}), seed=0, **kwargs)  # type: ignore[arg-type]


def test_inconsistent_manifest() -> None:
    manifest = synthetic("single_root", {None: 5})
    stray = ImageEntry("train/cats/x.jpg", 0, "cats", "e" * 64, "train")
    with pytest.raises(DataError, match=r"inconsistent"):
        split_manifest(manifest.with_images([*manifest.images, stray]), seed=0)
