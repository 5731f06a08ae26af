"""Suspect labels: training images whose label a probe on the other images' features finds
least likely (no Prefect import)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from catdog.data import quality
from catdog.data.findings import Suspect
from catdog.data.records import ImageEntry

LISTED_SUSPECTS = 20  # kept in the record and shown in the report


def rank_suspects(
    features: np.ndarray,
    labels: np.ndarray,
    images: Sequence[ImageEntry],
    num_classes: int,
    *,
    seed: int,
    limit: int = LISTED_SUSPECTS,
) -> list[Suspect]:
    """The `limit` images whose own label a cross-validated linear probe on `features`
    (`quality.out_of_fold_label_probability`) finds least likely, the least likely first;
    none when a class has fewer than two images (no fold could hold one out).

    Args:
        features: One row per image, in the order of `images` and `labels`.
        labels: Each image's class index.
        images: The images, for their paths and class names.
        num_classes: Classes the labels index.
        seed: Assigns the images to folds.
        limit: Suspects returned at most.
    """
    smallest = min(np.bincount(labels, minlength=num_classes))
    if smallest < 2:
        return []
    probability = quality.out_of_fold_label_probability(
        np.asarray(features), labels, num_classes, folds=min(5, smallest), seed=seed
    )
    return [
        Suspect(
            path=images[i].path,
            label=images[i].class_name,
            probability=round(float(probability[i]), 4),
        )
        for i in np.argsort(probability, kind="stable")[:limit]
    ]
