"""Label counts and the majority-class baseline."""

from __future__ import annotations

import json

import pytest

from catdog.data.counts import LabelCounts, count_labels
from catdog.data.records import ImageEntry, Manifest


def split_manifest_of(per_split: dict[str, dict[str, int]], classes=("cats", "dogs")) -> Manifest:
    images = [
        ImageEntry(
            path=f"{split}/{class_name}/{index}.jpg",
            label=classes.index(class_name),
            class_name=class_name,
            sha256=f"{split}{class_name}{index}",
            source_split=split,
            split=split,
        )
        for split, per_class in per_split.items()
        for class_name, n in per_class.items()
        for index in range(n)
    ]
    return Manifest(
        root="/x", layout="train_validation_test", classes=classes, images=tuple(images)
    )


def test_balanced_like_the_real_data() -> None:
    manifest = split_manifest_of(
        {
            "train": {"cats": 10, "dogs": 10},
            "validation": {"cats": 4, "dogs": 4},
            "test": {"cats": 1, "dogs": 1},
        }
    )
    result = count_labels(manifest)
    assert result.counts == {
        "train": {"cats": 10, "dogs": 10},
        "validation": {"cats": 4, "dogs": 4},
        "test": {"cats": 1, "dogs": 1},
    }
    assert result.majority_class == "cats"  # a tie goes to the first class
    assert result.baseline == {"train": 0.5, "validation": 0.5, "test": 0.5}
    assert result.imbalance_warning is None
    assert json.loads(json.dumps(result.to_json())) == {
        "counts": result.counts,
        "baseline": result.baseline,
        "majority_class": "cats",
        "imbalance_warning": None,
    }


def test_baseline_uses_the_train_majority_class() -> None:
    manifest = split_manifest_of(
        {
            "train": {"cats": 30, "dogs": 10, "fish": 20},
            "validation": {"cats": 1, "dogs": 3, "fish": 0},
            "test": {"cats": 2, "dogs": 2, "fish": 1},
        },
        classes=("cats", "dogs", "fish"),
    )
    result = count_labels(manifest)
    assert result.majority_class == "cats"
    assert result.counts["validation"] == {"cats": 1, "dogs": 3, "fish": 0}
    # Validation's own majority is dogs, but a constant predictor fitted on train says cats.
    assert result.baseline == {"train": 0.5, "validation": 0.25, "test": 0.4}
    assert result.imbalance_warning is not None
    assert "'cats' has 30 images, 'dogs' has 10 (3.00x)" in result.imbalance_warning


def test_imbalance_threshold(caplog: pytest.LogCaptureFixture) -> None:
    split = {"validation": {"cats": 1, "dogs": 1}, "test": {"cats": 1, "dogs": 1}}
    at_limit = split_manifest_of({"train": {"cats": 10, "dogs": 15}, **split})
    assert count_labels(at_limit).imbalance_warning is None
    over = split_manifest_of({"train": {"cats": 10, "dogs": 16}, **split})
    with caplog.at_level("WARNING"):
        result = count_labels(over)
    assert result.majority_class == "dogs"
    assert result.imbalance_warning is not None
    assert "train split is imbalanced" in caplog.text


def test_unsplit_manifest_is_refused() -> None:
    manifest = split_manifest_of({"train": {"cats": 1, "dogs": 1}})
    unsplit = manifest.with_images(
        ImageEntry(e.path, e.label, e.class_name, e.sha256, e.source_split) for e in manifest.images
    )
    with pytest.raises(ValueError, match=r"2 image\(s\) have no split"):
        count_labels(unsplit)


def test_frozen() -> None:
    result = count_labels(split_manifest_of({"train": {"cats": 1, "dogs": 1}}))
    assert isinstance(result, LabelCounts)
    assert result.baseline["test"] == 0.0  # an empty split has no accuracy to speak of
    with pytest.raises(AttributeError):
        result.majority_class = "dogs"  # type: ignore[misc]
