"""Frozen-base features, computed once per (images, weights, size) and reused by every epoch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catdog.arrays import NpyRows, NpyWriter, Rows

logger = logging.getLogger(__name__)

# The feature cache's files, as `extract_features` writes them into its folder.
TRAIN_FILE = "train.npy"  # float32 (views, n_train, dim)
TRAIN_LABELS_FILE = "y_train.npy"  # int32 (n_train,)
VAL_FILE = "val.npy"  # float32 (n_val, dim)
VAL_LABELS_FILE = "y_val.npy"  # int32 (n_val,)


@dataclass
class FeatureSet:
    """Cached features, read from disk a batch at a time (`catdog.arrays.NpyRows`)."""

    train: Rows  # float32, views * n_train rows of dim: row v * n_train + i is view v of image i
    y_train: np.ndarray  # int32 (n_train,)
    val: Rows  # float32, n_val rows of dim
    y_val: np.ndarray  # int32 (n_val,)
    num_classes: int

    @property
    def dim(self) -> int:
        return int(self.train.shape[-1])

    @property
    def views(self) -> int:
        return len(self.train) // max(1, len(self.y_train))

    @classmethod
    def load(cls, folder: Path, num_classes: int) -> FeatureSet:
        return cls(
            train=NpyRows(folder / TRAIN_FILE, leading=2),
            y_train=np.load(folder / TRAIN_LABELS_FILE),
            val=NpyRows(folder / VAL_FILE),
            y_val=np.load(folder / VAL_LABELS_FILE),
            num_classes=num_classes,
        )


def unaugmented_train_features(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every training image's features without augmentation (view 0, memory-mapped, in the
    split's order) and their labels, from a folder `extract_features` wrote."""
    return (
        np.load(folder / TRAIN_FILE, mmap_mode="r")[0],
        np.load(folder / TRAIN_LABELS_FILE),
    )


# Pooled MobileNetV2 features per image; `feature_bytes` sizes the stage before it starts.
BASE_FEATURE_DIM = 1280


def feature_bytes(n_train: int, n_val: int, views: int) -> int:
    """Disk space that `extract_features` needs (float32 features and int32 labels)."""
    return (max(1, views) * n_train + n_val) * (BASE_FEATURE_DIM * 4 + 4)


def extract_features(
    x_train: Rows,
    y_train: np.ndarray,
    x_val: Rows,
    y_val: np.ndarray,
    folder: Path,
    *,
    model_name: str,
    num_classes: int,
    weights: str | None,
    views: int,
    seed: int,
    batch_size: int = 64,
) -> FeatureSet:
    """Pooled features of the frozen MobileNetV2 base for train views and validation images.

    The base and augmentation are those of model `model_name`, a frozen-base model. Features
    are written to `folder` as they are computed (train.npy of shape (views, n_train, dim),
    val.npy, and the labels), so memory holds one batch, not the split.

    View 0 is the image as is, view 1 its mirror image, further views are draws of the
    model's own augmentation (RandomFlip + RandomRotation), so the head is trained on what
    the frozen base would have seen through the augmentation layers.

    Raises:
        DiskSpaceError: The disk filled up while writing.
    """
    import keras

    from catdog import models

    keras.utils.set_random_seed(seed)
    model = models.build_model(
        model_name, tuple(x_train.shape[1:]), num_classes, weights=weights, seed=seed
    )
    extractor = models.feature_extractor(model)
    augment = models.get_augmentation(model)
    dim = int(extractor.output_shape[-1])
    views = max(1, views)
    purpose = f"extract_features ({model_name})"

    def embed(images: Rows, view: int, out: NpyWriter) -> None:
        """Features of one view of `images`, a batch at a time to bound memory."""
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].astype(np.float32)
            if view == 1:
                batch = batch[:, :, ::-1, :]
            elif view >= 2:
                batch = np.asarray(augment(batch, training=True))
            # Not `predict`: its per-call input pipeline competes with the model for the
            # cores, and on 2 cores it ran at about half the throughput of this (47 against
            # 90 images/s at 224x224).
            out.write(np.asarray(extractor.predict_on_batch(batch), dtype=np.float32))

    folder.mkdir(parents=True, exist_ok=True)
    with NpyWriter(
        folder / TRAIN_FILE, (views, len(x_train), dim), np.float32, purpose, leading=2
    ) as out:
        for view in range(views):
            embed(x_train, view, out)
            logger.info("features: train view %d of %d done", view + 1, views)
    with NpyWriter(folder / VAL_FILE, (len(x_val), dim), np.float32, purpose) as out:
        embed(x_val, 0, out)
    np.save(folder / TRAIN_LABELS_FILE, np.asarray(y_train, dtype=np.int32))
    np.save(folder / VAL_LABELS_FILE, np.asarray(y_val, dtype=np.int32))
    return FeatureSet.load(folder, num_classes)
