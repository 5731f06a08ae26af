"""Frozen-base features, computed once per (images, weights, size) and reused by every epoch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

FEATURE_FILES = ("train", "y_train", "val", "y_val")


@dataclass
class FeatureSet:
    train: np.ndarray  # float32 (views, n_train, dim): view 0 plain, 1 flipped, 2+ augmented
    y_train: np.ndarray  # int32 (n_train,)
    val: np.ndarray  # float32 (n_val, dim)
    y_val: np.ndarray  # int32 (n_val,)
    num_classes: int

    @property
    def dim(self) -> int:
        return int(self.train.shape[-1])

    def save(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name in FEATURE_FILES:
            path = folder / f"{name}.npy"
            np.save(path, getattr(self, name))
            paths.append(path)
        return paths

    @classmethod
    def load(cls, folder: Path, num_classes: int) -> FeatureSet:
        arrays = {name: np.load(folder / f"{name}.npy") for name in FEATURE_FILES}
        return cls(num_classes=num_classes, **arrays)


def extract_features(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    model_name: str,
    num_classes: int,
    weights: str | None,
    views: int,
    seed: int,
    batch_size: int = 64,
) -> FeatureSet:
    """Pooled features of the frozen MobileNetV2 base for train views and validation images.

    The base and augmentation are those of model `model_name`, a frozen-base model.

    View 0 is the image as is, view 1 its mirror image, further views are draws of the
    model's own augmentation (RandomFlip + RandomRotation), so the head is trained on what
    the frozen base would have seen through the augmentation layers.
    """
    import keras

    from catdog import models

    keras.utils.set_random_seed(seed)
    model = models.build_model(
        model_name, x_train.shape[1:], num_classes, weights=weights, seed=seed
    )
    extractor = models.feature_extractor(model)
    augment = models.get_augmentation(model)
    dim = int(extractor.output_shape[-1])

    def embed(images: np.ndarray, view: int) -> np.ndarray:
        """Features of one view of `images`, a batch at a time to bound memory."""
        out = np.empty((len(images), dim), np.float32)
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].astype(np.float32)
            if view == 1:
                batch = batch[:, :, ::-1, :]
            elif view >= 2:
                batch = np.asarray(augment(batch, training=True))
            # Not `predict`: its per-call input pipeline competes with the model for the
            # cores, and on 2 cores it ran at about half the throughput of this (47 against
            # 90 images/s at 224x224).
            out[start : start + len(batch)] = extractor.predict_on_batch(batch)
        return out

    stacks = []
    for view in range(max(1, views)):
        stacks.append(embed(x_train, view))
        logger.info("features: train view %d of %d done", view + 1, views)
    val = embed(x_val, 0)
    return FeatureSet(
        train=np.stack(stacks).astype(np.float32),
        y_train=np.asarray(y_train, dtype=np.int32),
        val=val.astype(np.float32),
        y_val=np.asarray(y_val, dtype=np.int32),
        num_classes=num_classes,
    )
