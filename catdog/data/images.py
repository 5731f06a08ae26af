"""Decode each image once into a fixed-size uint8 array, so no epoch decodes a JPEG again."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from catdog.data.records import Manifest

logger = logging.getLogger(__name__)


def load_image(path: Path, size: int) -> np.ndarray:
    """Read one image as an RGB uint8 array of shape (size, size, 3).

    Like `image_dataset_from_directory`, the image is stretched to a square with bilinear
    interpolation (no crop, no padding). JPEGs are decoded at a reduced scale first when
    that is still at least `size`, which is much faster and visually the same.
    """
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (size, size))
        rgb = image.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)


def load_images(paths: Sequence[Path], size: int, workers: int | None = None) -> np.ndarray:
    """Decode `paths` in parallel (Pillow releases the GIL) into one (n, size, size, 3) array."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    if not paths:
        return out
    workers = workers or min(8, (os.cpu_count() or 1) * 2)

    def fill(index: int) -> None:
        out[index] = load_image(paths[index], size)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fill, range(len(paths))))
    return out


def decode_split(manifest: Manifest, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and integer labels of one split of a split manifest, in manifest order."""
    entries = manifest.in_split(split)
    images = load_images(manifest.paths(entries), size)
    labels = np.asarray([entry.label for entry in entries], dtype=np.int32)
    logger.info("decoded %d %s images at %dx%d", len(entries), split, size, size)
    return images, labels
