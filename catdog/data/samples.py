"""What a person looks at first: a few images per class and what augmentation does to one."""

from __future__ import annotations

import hashlib

import numpy as np

from catdog.data.images import load_image
from catdog.data.records import ImageEntry, Manifest

SAMPLES_FIGURE = "samples.png"  # the blog's grid of training images per class
AUGMENTATION_FIGURE = "augmentation.png"  # one image under several draws of the augmentation


def pick_samples(
    manifest: Manifest, *, per_class: int, seed: int, size: int, split: str = "train"
) -> dict[str, list[np.ndarray]]:
    """`per_class` images of each class from `split`, chosen reproducibly for `seed`."""
    shown = sample_entries(manifest, per_class=per_class, seed=seed, split=split)
    return {
        name: [load_image(path, size) for path in manifest.paths(entries)]
        for name, entries in shown.items()
    }


def sample_entries(
    manifest: Manifest, *, per_class: int, seed: int, split: str = "train"
) -> dict[str, list[ImageEntry]]:
    """The images `pick_samples` shows, by class: those whose content hash ranks first for
    `seed`, so that new images change the choice only when one of them ranks among them."""
    chosen: dict[str, list[ImageEntry]] = {}
    entries = manifest.in_split(split)
    for label, name in enumerate(manifest.classes):
        of_class = [entry for entry in entries if entry.label == label]
        of_class.sort(key=lambda e: hashlib.sha256(f"{seed}:{e.sha256}".encode()).hexdigest())
        chosen[name] = of_class[:per_class]
    return chosen


def augmentation_views(image: np.ndarray, *, draws: int, seed: int) -> list[np.ndarray]:
    """`draws` outputs of the models' augmentation (RandomFlip + RandomRotation) seeded `seed`."""
    from catdog import models

    augment = models.make_augmentation(seed)
    batch = np.repeat(image[None].astype("float32"), draws, axis=0)
    views = np.asarray(augment(batch, training=True))
    return [np.clip(view, 0, 255).astype(np.uint8) for view in views]
