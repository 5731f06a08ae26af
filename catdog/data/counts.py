"""Images per split and class, and the accuracy a constant predictor would reach."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from catdog.data.records import SPLITS, Manifest

logger = logging.getLogger(__name__)

# The train split counts as imbalanced when its largest class has more than this many times
# the images of its smallest: from there on accuracy alone starts to flatter a model.
IMBALANCE_RATIO = 1.5


@dataclass(frozen=True)
class LabelCounts:
    """Label counts of a split manifest and the majority-class baseline."""

    counts: dict[str, dict[str, int]]  # counts[split][class], every split and class present
    baseline: dict[str, float]  # per split: accuracy of always predicting majority_class
    majority_class: str  # most frequent class in train (ties: the first in class order)
    imbalance_warning: str | None  # set when train's largest class > 1.5x its smallest

    def to_json(self) -> dict[str, Any]:  # counts.json and the record's fields
        """A JSON-able dict of all fields."""
        return asdict(self)


def count_labels(manifest: Manifest) -> LabelCounts:
    """Count images per split and class, and compute the majority-class baseline.

    The baseline of a split is the share of its images that belong to the train split's
    majority class: what a constant predictor fitted on train would score there.

    Args:
        manifest: A split manifest (every image has `split` set).

    Returns:
        The counts, per-split baselines, train's majority class and an imbalance warning.

    Raises:
        ValueError: Some images have no split yet (run `split_manifest` first).
    """
    unsplit = sum(1 for image in manifest.images if image.split is None)
    if unsplit:
        raise ValueError(f"{unsplit} image(s) have no split; split the manifest first")
    counts = {split: dict.fromkeys(manifest.classes, 0) for split in SPLITS}
    for image in manifest.images:
        counts[image.split][image.class_name] += 1  # type: ignore[index]

    train = counts["train"]
    # max() returns the first maximal item, so ties go to the first class in sorted order.
    majority = max(manifest.classes, key=lambda name: train[name])
    baseline = {
        split: (counts[split][majority] / total if (total := sum(counts[split].values())) else 0.0)
        for split in SPLITS
    }

    warning = None
    largest = max(manifest.classes, key=lambda name: train[name])
    smallest = min(manifest.classes, key=lambda name: train[name])
    if train[largest] > IMBALANCE_RATIO * train[smallest]:
        ratio = f"{train[largest] / train[smallest]:.2f}x" if train[smallest] else "no images"
        warning = (
            f"train split is imbalanced: {largest!r} has {train[largest]} images, "
            f"{smallest!r} has {train[smallest]} ({ratio}); compare accuracy with the "
            f"majority baseline ({baseline['train']:.3f} on train)"
        )
        logger.warning("%s", warning)
    return LabelCounts(
        counts=counts, baseline=baseline, majority_class=majority, imbalance_warning=warning
    )
