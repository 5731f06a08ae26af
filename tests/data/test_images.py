"""Decoded pixels against the blog's loader, `keras.utils.image_dataset_from_directory`."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from catdog.data.images import load_image

# Lossless PNGs, so the two decoders agree exactly and only the resizing is compared. Sizes:
# larger in both sides, smaller in both, mixed, and already square at the target.
SIZES = [(500, 374), (41, 30), (149, 200), (160, 160)]


def _smooth_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    # Noise blurred into blobs: detail at every scale, as in a photograph.
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, size[1] // 8), max(2, size[0] // 8), 3), np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    noisy = np.asarray(image, np.int16) + rng.integers(-40, 41, (size[1], size[0], 3))
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("side", [160, 224])
def test_pixels_match_image_dataset_from_directory(tmp_path, side):
    folder = tmp_path / "images" / "only"
    folder.mkdir(parents=True)
    for index, size in enumerate(SIZES):
        _smooth_image(folder / f"{index}.png", size, seed=index)

    dataset = keras.utils.image_dataset_from_directory(
        tmp_path / "images", image_size=(side, side), shuffle=False, batch_size=len(SIZES)
    )
    blog_images = next(iter(dataset))[0].numpy()

    for path, blog in zip(dataset.file_paths, blog_images, strict=True):
        ours = load_image(Path(path), side).astype(np.float32)
        assert ours.shape == (side, side, 3)
        # The blog keeps float pixels, Pillow rounds in fixed point to uint8: one level apart.
        assert np.abs(ours - blog).max() < 1.01, Path(path).name
