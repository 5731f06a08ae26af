"""Decode each image once into a fixed-size uint8 array, so no epoch decodes a JPEG again.

A split is decoded straight to disk (`decode_split_to`) a chunk at a time, so decoding holds a
chunk, not the split, in memory; readers then read it a batch at a time (`catdog.arrays`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from catdog.arrays import NpyRows, NpyWriter, require_space
from catdog.data.records import SPLITS, Manifest
from catdog.io import atomic_write_json
from catdog.pieces import PieceStore, Reuse

logger = logging.getLogger(__name__)


def load_image(path: Path, size: int) -> np.ndarray:
    """Read one image as an RGB uint8 array of shape (size, size, 3).

    The pixels are those `image_dataset_from_directory` gives (to within rounding): the full
    image stretched to a square (no crop, no padding) by `tf.image.resize`'s bilinear
    interpolation, which samples the source at each output pixel's centre without
    antialiasing. Pillow's `resize` averages over the whole footprint instead, and decoding a
    JPEG at a reduced scale does too: such images kept 0.58 times the blog's fine detail at
    160x160, and model3 at seed 1337 started learning epochs later on them (bench/RESULTS.md,
    decode-parity; bench/HISTORY.md, model3-seeds).
    """
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if rgb.size != (size, size):
        width, height = rgb.size
        # An affine map samples bilinearly at (x + 0.5) * width / size, as tf.image.resize does.
        rgb = rgb.transform(
            (size, size),
            Image.Transform.AFFINE,
            (width / size, 0, 0, 0, height / size, 0),
            resample=Image.Resampling.BILINEAR,
        )
    return np.asarray(rgb, dtype=np.uint8)


def _workers() -> int:
    return min(8, (os.cpu_count() or 1) * 2)


def load_images(
    paths: Sequence[Path], size: int, pool: ThreadPoolExecutor | None = None
) -> np.ndarray:
    """Decode `paths` in parallel (Pillow releases the GIL) into one (n, size, size, 3) array."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    if not paths:
        return out

    def fill(index: int) -> None:
        out[index] = load_image(paths[index], size)

    if pool is not None:
        list(pool.map(fill, range(len(paths))))
    else:
        with ThreadPoolExecutor(max_workers=_workers()) as own:
            list(own.map(fill, range(len(paths))))
    return out


def decode_split(manifest: Manifest, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and integer labels of one split of a split manifest, in manifest order."""
    entries = manifest.in_split(split)
    images = load_images(manifest.paths(entries), size)
    labels = np.asarray([entry.label for entry in entries], dtype=np.int32)
    logger.info("decoded %d %s images at %dx%d", len(entries), split, size, size)
    return images, labels


def split_files(folder: Path, split: str) -> tuple[Path, Path]:
    """Where a decoded split's images (`{split}_x.npy`) and labels (`{split}_y.npy`) are."""
    return folder / f"{split}_x.npy", folder / f"{split}_y.npy"


def split_keys_file(folder: Path, split: str) -> Path:
    """Where a decoded split lists its images' content hashes, in row order."""
    return folder / f"{split}_keys.json"


def open_split(folder: Path, split: str) -> tuple[NpyRows, np.ndarray]:
    """A decoded split: its images, read from disk on demand, and its labels, in memory."""
    images, labels = split_files(folder, split)
    return NpyRows(images), np.load(labels)


class DecodedOnDemand:
    """A split's images decoded only when read, a batch at a time (the `Rows` protocol): for a
    side no decode stage produced, such as the production model's at the promotion gate."""

    dtype = np.dtype(np.uint8)

    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths = list(paths)
        self.size = size

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.paths), self.size, self.size, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray:
        if isinstance(index, slice):
            return load_images(self.paths[index], self.size)
        if np.ndim(index) == 0:
            return load_image(self.paths[int(index)], self.size)
        return load_images([self.paths[int(i)] for i in np.asarray(index)], self.size)


def split_bytes(manifest: Manifest, size: int) -> int:
    """Disk space that `decode_split_to` needs for every split of `manifest` at `size`."""
    per_image = size * size * 3 + np.dtype(np.int32).itemsize
    return len([e for e in manifest.images if e.split]) * per_image


def decode_splits_to(
    manifest: Manifest, size: int, folder: Path, pixels: PieceStore, chunk: int = 256
) -> Reuse:
    """Decode every split of `manifest` into `folder` (as `decode_split_to` does, and each
    split's content hashes into `{split}_keys.json`), decoding only the images whose pixels
    `pixels` does not hold yet, and sealing those into it first.

    Raises:
        DiskSpaceError: The disk filled up while writing.
    """
    purpose = f"decode_images (pixels at {size}x{size})"
    entries = [entry for entry in manifest.images if entry.split]
    located = pixels.locate()
    missing = [entry for entry in entries if entry.sha256 not in located]
    require_space(folder, piece_bytes(manifest, size, len(missing)), "decode_images")
    with (
        pixels.adding_rows((size, size, 3), np.uint8, len(missing), purpose) as packer,
        ThreadPoolExecutor(max_workers=_workers()) as pool,
    ):
        for start in range(0, len(missing), chunk):
            part = missing[start : start + chunk]
            packer.add([e.sha256 for e in part], load_images(manifest.paths(part), size, pool))
    if missing:
        located = pixels.locate()
    for split in SPLITS:
        in_split = manifest.in_split(split)
        keys = [entry.sha256 for entry in in_split]
        x_path, y_path = split_files(folder, split)
        split_purpose = f"decode_images ({split} split at {size}x{size})"
        with NpyWriter(x_path, (len(keys), size, size, 3), np.uint8, split_purpose) as images:
            pixels.gather(keys, images, located)
        with NpyWriter(y_path, (len(keys),), np.int32, split_purpose) as labels:
            labels.write(np.asarray([entry.label for entry in in_split], dtype=np.int32))
        atomic_write_json(split_keys_file(folder, split), keys)
    logger.info(
        "pixels at %dx%d: %d images decoded, %d reused",
        size,
        size,
        len(missing),
        len(entries) - len(missing),
    )
    return Reuse(len(missing), len(entries) - len(missing))


def piece_bytes(manifest: Manifest, size: int, new: int) -> int:
    """Disk space that `decode_splits_to` needs: the split files, and `new` images' pieces."""
    return split_bytes(manifest, size) + new * size * size * 3


def decode_split_to(
    manifest: Manifest, split: str, size: int, folder: Path, chunk: int = 256
) -> tuple[Path, Path]:
    """Decode one split into `{split}_x.npy` (uint8 images) and `{split}_y.npy` (int32 labels).

    The files hold the same bytes as `np.save` of `decode_split`'s arrays; at most `chunk`
    decoded images are in memory at a time.

    Raises:
        DiskSpaceError: The disk filled up while writing.
    """
    entries = manifest.in_split(split)
    paths = manifest.paths(entries)
    x_path, y_path = split_files(folder, split)
    purpose = f"decode_images ({split} split at {size}x{size})"
    with (
        NpyWriter(x_path, (len(entries), size, size, 3), np.uint8, purpose) as images,
        ThreadPoolExecutor(max_workers=_workers()) as pool,
    ):
        for start in range(0, len(paths), chunk):
            images.write(load_images(paths[start : start + chunk], size, pool))
    with NpyWriter(y_path, (len(entries),), np.int32, purpose) as labels:
        labels.write(np.asarray([entry.label for entry in entries], dtype=np.int32))
    logger.info("decoded %d %s images at %dx%d", len(entries), split, size, size)
    return x_path, y_path
