"""Decode each image once into a fixed-size uint8 array, so no epoch decodes a JPEG again.

Each image is decoded once per size, by its content: its pixels are a piece (catdog.pieces),
decoded a chunk at a time and sealed into the pixel store, and a decoded split is the list of
its images' pieces (`decode_splits_to`), read a batch at a time (`open_split`, catdog.arrays).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from catdog.arrays import NpyRows, NpyWriter, Rows, require_space
from catdog.data.records import SPLITS, Manifest
from catdog.hashing import read_checked
from catdog.io import atomic_write_json
from catdog.pieces import PieceRows, PieceStore, Reuse

logger = logging.getLogger(__name__)


def load_image(path: Path, size: int, sha256: str | None = None) -> np.ndarray:
    """Read one image as an RGB uint8 array of shape (size, size, 3); with `sha256`, only if
    its bytes are still those (see `read_checked`).

    The pixels are those `image_dataset_from_directory` gives (to within rounding): the full
    image stretched to a square (no crop, no padding) by `tf.image.resize`'s bilinear
    interpolation, which samples the source at each output pixel's centre without
    antialiasing. Pillow's `resize` averages over the whole footprint instead, and decoding a
    JPEG at a reduced scale does too: such images kept 0.58 times the blog's fine detail at
    160x160, and model3 at seed 1337 started learning epochs later on them (bench/RESULTS.md,
    decode-parity; bench/HISTORY.md, model3-seeds).
    """
    source = io.BytesIO(read_checked(path, sha256)) if sha256 else path
    with Image.open(source) as image:
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
    paths: Sequence[Path],
    size: int,
    pool: ThreadPoolExecutor | None = None,
    sha256s: Sequence[str] | None = None,
) -> np.ndarray:
    """Decode `paths` in parallel (Pillow releases the GIL) into one (n, size, size, 3) array;
    with `sha256s`, each file is checked against its hash first (see `load_image`)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    if not paths:
        return out

    def fill(index: int) -> None:
        out[index] = load_image(paths[index], size, sha256s[index] if sha256s else None)

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


def open_split(
    folder: Path, split: str, pixels: PieceStore | None = None
) -> tuple[Rows, np.ndarray]:
    """A decoded split: its images, read from disk on demand (from `{split}_x.npy` where it
    was written whole, else from the pixel pieces in `pixels`), and its labels, in memory."""
    images, labels = split_files(folder, split)
    if images.is_file() or pixels is None:
        return NpyRows(images), np.load(labels)
    listed = json.loads(split_keys_file(folder, split).read_text(encoding="utf-8"))
    rows = PieceRows(listed["keys"], pixels.locate(), tuple(listed["shape"]), np.uint8)
    return rows, np.load(labels)


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


# The split whose images are written out whole: the export check reads them by path, in a
# process of its own. The others are read from the pixel pieces where they lie.
MATERIALIZED = ("test",)


@dataclass(frozen=True)
class Decoded:
    """What `decode_splits_to` did: images decoded and reused, and the pixel packs the
    splits read (path -> SHA-256 of its rows)."""

    reuse: Reuse
    packs: dict[Path, str]


def decode_splits_to(
    manifest: Manifest, size: int, folder: Path, pixels: PieceStore, chunk: int = 256
) -> Decoded:
    """Decode every split of `manifest` for `folder`, decoding only the images whose pixels
    `pixels` does not hold yet (sealed into it first, each checked against the content hash
    the manifest gave it).

    Each split gets its labels (`{split}_y.npy`) and its images' content hashes in row order
    (`{split}_keys.json`, which `open_split` reads its rows by); the test split's images are
    also written whole (`test_x.npy`, see MATERIALIZED).

    Raises:
        DiskSpaceError: The disk filled up while writing.
        ImageChangedError: An image's bytes are not those the manifest hashed.
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
            keys = [entry.sha256 for entry in part]
            packer.add(keys, load_images(manifest.paths(part), size, pool, sha256s=keys))
    if missing:
        located = pixels.locate()
    for split in SPLITS:
        in_split = manifest.in_split(split)
        keys = [entry.sha256 for entry in in_split]
        _, y_path = split_files(folder, split)
        split_purpose = f"decode_images ({split} split at {size}x{size})"
        with NpyWriter(y_path, (len(keys),), np.int32, split_purpose) as labels:
            labels.write(np.asarray([entry.label for entry in in_split], dtype=np.int32))
        atomic_write_json(
            split_keys_file(folder, split), {"shape": [size, size, 3], "keys": keys}, compact=True
        )
        if split in MATERIALIZED:
            x_path = split_files(folder, split)[0]
            with NpyWriter(x_path, (len(keys), size, size, 3), np.uint8, split_purpose) as out:
                pixels.gather(keys, out, located)
    logger.info(
        "pixels at %dx%d: %d images decoded, %d reused",
        size,
        size,
        len(missing),
        len(entries) - len(missing),
    )
    return Decoded(
        Reuse(len(missing), len(entries) - len(missing)),
        pixels.pack_files([entry.sha256 for entry in entries], located),
    )


def piece_bytes(manifest: Manifest, size: int, new: int) -> int:
    """Disk space that `decode_splits_to` needs: `new` images' pieces, the materialized
    splits' images, every split's labels."""
    row = size * size * 3
    written = sum(len(manifest.in_split(split)) for split in MATERIALIZED)
    return (new + written) * row + len(manifest.images) * np.dtype(np.int32).itemsize


def split_keys(folder: Path, split: str) -> list[str]:
    """The content hashes of a decoded split's images, in row order."""
    return list(json.loads(split_keys_file(folder, split).read_text(encoding="utf-8"))["keys"])
