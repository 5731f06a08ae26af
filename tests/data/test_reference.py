"""The reference a promoted model keeps, and which data checks run against it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from catdog.data import quality
from catdog.data.records import ImageEntry, Manifest
from catdog.data.reference import (
    FEATURES_SAMPLE_FILE,
    REFERENCE_FILE,
    ReferenceFiles,
    compare_with_production,
    write_features_sample,
    write_reference,
)


def split_manifest(counts: dict[str, dict[str, int]]) -> Manifest:
    """A split manifest with `counts[split][class]` images, named `<split>/<class>/<i>.jpg`."""
    classes = sorted({name for per_class in counts.values() for name in per_class})
    images = [
        ImageEntry(f"{split}/{name}/{i}.jpg", classes.index(name), name, "0" * 64, split, split)
        for split, per_class in counts.items()
        for name, n in per_class.items()
        for i in range(n)
    ]
    return Manifest("/images", "train_validation", tuple(classes), tuple(images))


def inspection_of(
    manifest: Manifest, seed: int = 0, *, brighter: float = 0.0
) -> quality.Inspection:
    """Made-up properties for every image of `manifest` (brightness moved by `brighter`)."""
    rng = np.random.default_rng(seed)
    values = rng.normal(100, 10, (len(manifest.images), len(quality.PROPERTIES)))
    values[:, quality.PROPERTIES.index("brightness")] += brighter
    return quality.Inspection(
        paths=tuple(entry.path for entry in manifest.images),
        values=values,
        modes=("RGB",) * len(manifest.images),
        hashes=np.zeros((len(manifest.images), len(quality.CROP_SCALES)), dtype=np.uint64),
    )


def reference_in(
    folder: Path,
    train: dict[str, int],
    *,
    seed: int = 0,
    brighter: float = 0.0,
    features: np.ndarray | None = None,
    about: str = "model4 at 64px",
) -> ReferenceFiles:
    """A run's reference files in `folder`, as its profile and suspects stages write them."""
    folder.mkdir(parents=True)
    manifest = split_manifest({"train": train, "validation": {"cats": 5, "dogs": 5}})
    properties = write_reference(folder, inspection_of(manifest, seed, brighter=brighter), manifest)
    if features is None:
        return ReferenceFiles(properties)
    return ReferenceFiles(properties, write_features_sample(folder, features, about, seed))


def test_the_reference_holds_the_training_split_only_in_its_order(tmp_path):
    manifest = split_manifest({"validation": {"cats": 2}, "train": {"cats": 3, "dogs": 1}})
    inspection = inspection_of(manifest)
    path = write_reference(tmp_path, inspection, manifest)
    assert path == tmp_path / REFERENCE_FILE
    with np.load(path) as reference:
        np.testing.assert_array_equal(reference["properties"], inspection.values[2:])
        assert list(reference["classes"]) == ["cats", "dogs"]
        assert list(reference["counts"]) == [3, 1]


def test_the_features_sample_keeps_what_computed_them_and_at_most_the_sample_size(tmp_path):
    few = np.arange(12, dtype=np.float64).reshape(4, 3)
    path = write_features_sample(tmp_path, few, "model4 at 64px", seed=0)
    assert path == tmp_path / FEATURES_SAMPLE_FILE
    with np.load(path) as sample:
        assert sample["rows"].dtype == np.float32 and str(sample["about"]) == "model4 at 64px"
        np.testing.assert_array_equal(sample["rows"], few)  # all of them, in order
    many = np.random.default_rng(0).normal(size=(quality.EMBEDDING_SAMPLE + 50, 3))
    with np.load(write_features_sample(tmp_path, many, "x", seed=0)) as sample:
        assert len(sample["rows"]) == quality.EMBEDDING_SAMPLE


PROPERTY_CHECKS = [f"property:{name}" for name in quality.PROPERTIES]


def test_without_features_on_either_side_the_balance_and_properties_are_checked(tmp_path):
    features = np.random.default_rng(0).normal(size=(100, 8))
    production = reference_in(tmp_path / "a", {"cats": 100, "dogs": 100}, features=features)
    current = reference_in(tmp_path / "b", {"cats": 100, "dogs": 100}, seed=1)
    comparison = compare_with_production(production, current, seed=0)
    assert [check.name for check in comparison.checks] == ["class_balance", *PROPERTY_CHECKS]
    assert comparison.note == "no cached features in this run: the embeddings were not compared"
    assert comparison.failed == []

    no_features = ReferenceFiles(production.properties)
    with_features = reference_in(tmp_path / "c", {"cats": 100, "dogs": 100}, features=features)
    comparison = compare_with_production(no_features, with_features, seed=0)
    assert len(comparison.checks) == 1 + len(quality.PROPERTIES)
    assert comparison.note == (
        "production's reference has no features: the embeddings were not compared"
    )


def test_features_of_another_origin_are_not_compared(tmp_path):
    features = np.random.default_rng(0).normal(size=(100, 8))
    production = reference_in(tmp_path / "a", {"cats": 100, "dogs": 100}, features=features)
    current = reference_in(
        tmp_path / "b", {"cats": 100, "dogs": 100}, features=features, about="model4 at 96px"
    )
    comparison = compare_with_production(production, current, seed=0)
    assert "embeddings" not in {check.name for check in comparison.checks}
    assert comparison.note == (
        "production's features (model4 at 64px) and this run's (model4 at 96px) differ: the "
        "embeddings were not compared"
    )


def test_every_check_runs_when_both_kept_features_and_a_change_fails_its_check(tmp_path):
    rng = np.random.default_rng(0)
    production = reference_in(
        tmp_path / "a", {"cats": 150, "dogs": 150}, features=rng.normal(size=(150, 8))
    )
    same = reference_in(
        tmp_path / "b", {"cats": 150, "dogs": 150}, seed=1, features=rng.normal(size=(150, 8))
    )
    comparison = compare_with_production(production, same, seed=0)
    names = [check.name for check in comparison.checks]
    assert names == ["class_balance", *PROPERTY_CHECKS, "embeddings"]
    assert comparison.note == "" and comparison.failed == []

    changed = reference_in(
        tmp_path / "c",
        {"cats": 150, "dogs": 75},
        seed=2,
        brighter=30.0,
        features=rng.normal(size=(150, 8)) + 1.0,
    )
    failed = {check.name for check in compare_with_production(production, changed, seed=0).failed}
    assert failed == {"class_balance", "property:brightness", "embeddings"}


@pytest.mark.parametrize("seed", [0, 1])
def test_the_comparison_is_the_same_for_the_same_seed(tmp_path, seed):
    rng = np.random.default_rng(seed)
    production = reference_in(
        tmp_path / "a", {"cats": 50, "dogs": 50}, features=rng.normal(size=(80, 8))
    )
    current = reference_in(
        tmp_path / "b", {"cats": 50, "dogs": 40}, seed=1, features=rng.normal(size=(80, 8))
    )
    assert compare_with_production(production, current, seed=seed) == compare_with_production(
        production, current, seed=seed
    )
