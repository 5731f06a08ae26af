"""Frozen-base features, computed once per (images, weights, size) and reused by every epoch."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from catdog.arrays import NpyRows, NpyWriter, Rows
from catdog.hashing import sha256_json
from catdog.pieces import PieceRows, PieceStore, Reuse

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


def view_seeds(keys: Sequence[str], view: int, seed: int) -> list[int]:
    """The seed of each image's augmented `view`: from its content, the view and the run's
    seed, so that a view is the same in whatever batch (and run) it is computed."""
    return [int(sha256_json([key, view, seed])[:8], 16) & 0x3FFFFFFF for key in keys]


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
    train_keys: Sequence[str],
    val_keys: Sequence[str],
    pieces: Callable[[int], PieceStore],
    batch_size: int = 64,
) -> tuple[FeatureSet, Reuse]:
    """Pooled features of the frozen MobileNetV2 base for train views and validation images.

    The base and augmentation are those of model `model_name`, a frozen-base model. Each
    image's features of each view are pieces (`pieces(view)`), kept by the image's content
    (`train_keys`, `val_keys`: a hash per row): only those no earlier run computed are
    computed, a batch at a time, and sealed; then the split's files are assembled from the
    pieces in `folder` (train.npy of shape (views, n_train, dim), val.npy, and the labels),
    so memory holds one batch, not the split.

    View 0 is the image as is, view 1 its mirror image, further views are draws of the
    model's own augmentation (RandomFlip + RandomRotation), each image with a seed of its own
    (`view_seeds`), so the head is trained on what the frozen base would have seen through the
    augmentation layers, and a view does not depend on the batch it was computed in.

    Returns:
        The features, and how many image views were computed and how many reused.

    Raises:
        DiskSpaceError: The disk filled up while writing.
    """
    if (len(train_keys), len(val_keys)) != (len(x_train), len(x_val)):
        raise ValueError("one content key per image is needed, in the images' order")
    from catdog.models import predict_batch

    views = max(1, views)
    purpose = f"extract_features ({model_name})"
    extractor: Any = None
    augment: Any = None

    def embed(rows: np.ndarray, keys: Sequence[str], *, view: int) -> np.ndarray:
        nonlocal extractor, augment
        if extractor is None:  # only when some piece is missing: a reuse builds no model
            extractor, augment = _extractor(x_train, model_name, num_classes, weights, seed)
            _remember(extractor, pieces(0))
        batch = rows.astype(np.float32)
        if view == 1:
            batch = batch[:, :, ::-1, :]
        elif view >= 2:
            batch = np.asarray(augment.call_seeded(batch, view_seeds(keys, view, seed)))
        # Not `predict`: its per-call input pipeline competes with the model for the cores,
        # and on 2 cores it ran at about half the throughput of a call per batch (47 against
        # 90 images/s at 224x224).
        return predict_batch(extractor, batch)

    reuse = Reuse()
    located: list[dict[str, tuple[Path, int]]] = []
    for view in range(views):
        sides = [(x_train, train_keys)] + ([(x_val, val_keys)] if view == 0 else [])
        found, counted = _add_missing(
            pieces(view), sides, partial(embed, view=view), purpose, batch_size
        )
        reuse += counted
        located.append(found)
        logger.info(
            "features: view %d of %d, %d computed, %d reused",
            view + 1,
            views,
            counted.computed,
            counted.reused,
        )

    folder.mkdir(parents=True, exist_ok=True)
    with NpyWriter(
        folder / TRAIN_FILE,
        (views, len(train_keys), BASE_FEATURE_DIM),
        np.float32,
        purpose,
        leading=2,
    ) as out:
        for view in range(views):
            pieces(view).gather(train_keys, out, located[view])
    with NpyWriter(
        folder / VAL_FILE, (len(val_keys), BASE_FEATURE_DIM), np.float32, purpose
    ) as out:
        pieces(0).gather(val_keys, out, located[0])
    np.save(folder / TRAIN_LABELS_FILE, np.asarray(y_train, dtype=np.int32))
    np.save(folder / VAL_LABELS_FILE, np.asarray(y_val, dtype=np.int32))
    return FeatureSet.load(folder, num_classes), reuse


def _add_missing(
    store: PieceStore,
    sides: Sequence[tuple[Rows, Sequence[str]]],
    embed: Callable[[np.ndarray, Sequence[str]], np.ndarray],
    purpose: str,
    batch_size: int = 64,
) -> tuple[dict[str, tuple[Path, int]], Reuse]:
    """Seal into `store` the features (`embed`) of every image of `sides` (images and their
    content keys) that it lacks, a batch at a time; where each piece now lies, and how many
    were computed and reused."""
    found = store.locate()
    missing = [
        (images, [row for row, key in enumerate(keys) if key not in found], keys)
        for images, keys in sides
    ]
    count = sum(len(rows) for _images, rows, _keys in missing)
    with store.adding_rows(
        (BASE_FEATURE_DIM,), np.float32, count, purpose, pack_rows=8192
    ) as packer:
        for images, rows, all_keys in missing:
            for start in range(0, len(rows), batch_size):
                part = rows[start : start + batch_size]
                keys = [all_keys[row] for row in part]
                packer.add(keys, embed(images[np.asarray(part)], keys))
    total = sum(len(keys) for _images, keys in sides)
    return (store.locate() if count else found), Reuse(count, total - count)


def features_of(
    images: Rows, keys: Sequence[str], extractor: Any, store: PieceStore, purpose: str
) -> tuple[np.ndarray, Reuse]:
    """The unaugmented features of `images` (their content `keys`, in row order) by a frozen
    base's `extractor`, in memory: those `store` holds are read from it, the rest computed
    and sealed there, so that a later run computes only images no run has seen."""

    from catdog.models import predict_batch

    def embed(rows: np.ndarray, _keys: Sequence[str]) -> np.ndarray:
        return predict_batch(extractor, rows)

    located, reuse = _add_missing(store, [(images, keys)], embed, purpose)
    rows = PieceRows(keys, located, (BASE_FEATURE_DIM,), np.float32)
    try:
        return rows.load(), reuse
    finally:
        rows.close()


# What a piece store's note of kind BASE_NOTE holds: the digest of the base that computed its
# pieces (`base_digest`), so that a saved model whose base has those weights is known to compute
# them without running it.
BASE_NOTE = "base"

# The last frozen-base extractor this process built, by its base's digest: a later stage of the
# same run (the evaluation) embeds the few test images the store lacks with it, instead of
# tracing the saved model's copy of the same base again (a second or two).
_BUILT: dict[str, Any] = {}


def base_digest(extractor: Any) -> str:
    """SHA-256 of a frozen base's weights: their shapes, dtypes and bytes, in layer order."""
    from catdog.models import get_base

    digest = hashlib.sha256()
    for array in get_base(extractor).get_weights():
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def base_of_pieces(store: PieceStore) -> str | None:
    """The digest of the base that computed `store`'s pieces, as noted there; None if unknown."""
    for note in store.notes(BASE_NOTE):
        return str(note.get("weights")) if note.get("weights") else None
    return None


def built_extractor(digest: str) -> Any | None:
    """This process's extractor of the base whose digest is `digest`, if it built one."""
    return _BUILT.get(digest)


def _remember(extractor: Any, store: PieceStore) -> None:
    digest = base_digest(extractor)
    _BUILT.clear()  # one base at a time: a MobileNetV2 holds 14 MB of weights
    _BUILT[digest] = extractor
    if base_of_pieces(store) != digest:
        store.add_note(BASE_NOTE, {"weights": digest})


def _extractor(
    images: Rows, model_name: str, num_classes: int, weights: str | None, seed: int
) -> tuple[Any, Any]:
    """The frozen base's feature extractor of model `model_name`, and its augmentation."""

    from catdog import models

    models.seed_everything(seed)
    model = models.build_model(
        model_name, tuple(images.shape[1:]), num_classes, weights=weights, seed=seed
    )
    extractor = models.feature_extractor(model)
    if int(extractor.output_shape[-1]) != BASE_FEATURE_DIM:
        raise ValueError(f"{model_name}'s base gives {extractor.output_shape[-1]} features")
    return extractor, models.get_augmentation(model)
