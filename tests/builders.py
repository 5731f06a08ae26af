"""The suite's one set of builders: real image files, image-folder datasets and their zips,
and the facts of a test split that the promotion gate judges on."""

from __future__ import annotations

import itertools
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from catdog.candidates import SplitFacts

# Which split folders each layout has; "val" shows the validation alias.
LAYOUT_SPLITS: dict[str, tuple[str | None, ...]] = {
    "train_validation": ("train", "validation"),
    "train_val": ("train", "val"),
    "train_validation_test": ("train", "validation", "test"),
    "single_root": (None,),
}

_unseeded = itertools.count(10**9)  # seeds for images asked for without one: all distinct


def write_image(
    path: Path,
    seed: int | None = None,
    *,
    size: tuple[int, int] = (40, 30),
    bright: bool | None = None,
    fmt: str = "JPEG",
    mode: str = "RGB",
) -> Path:
    """A small real image whose content depends on `seed` (a new one each call without it):
    noise over the whole range, or, with `bright`, light (True) or dark (False) noise, which a
    model tells apart in an epoch."""
    rng = np.random.default_rng(next(_unseeded) if seed is None else seed)
    if bright is None:
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    else:
        pixels = rng.integers(0, 80, (size[1], size[0], 3), dtype=np.uint8) + (
            170 if bright else 40
        )
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


def make_dataset(
    root: Path,
    *,
    train: int = 12,
    validation: int = 10,
    n: int | Mapping[str | None, int] | None = None,
    layout: str = "train_validation",
    classes: tuple[str, ...] = ("cats", "dogs"),
    seed: int = 0,
) -> Path:
    """`root/<split>/<class>/<class>.<i>.jpg` (no split folder for "single_root"), numbered
    through the splits as the real dataset is, the classes told apart by brightness. Images
    per class: `n` (for every split, or per split folder name), else `train` and `validation`."""
    counts = {"train": train, "validation": validation} if n is None else n
    counter = seed * 100_000
    numbers = dict.fromkeys(classes, 0)
    for split in LAYOUT_SPLITS[layout]:
        count = counts if isinstance(counts, int) else counts[split]
        for index, name in enumerate(classes):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(count):
                counter += 1
                path = folder / f"{name}.{numbers[name]}.jpg"
                write_image(path, counter, bright=index % 2 == 1)
                numbers[name] += 1
    return root


def zip_folder(
    folder: Path, archive: Path, prefix: str = "", *, folder_entries: bool = False
) -> Path:
    """Zip every file under `folder`, named `prefix` + its relative path; with
    `folder_entries`, a member for each folder too, as zip tools write them."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        if folder_entries and prefix:
            handle.writestr(prefix, b"")
        for path in sorted(folder.rglob("*")):
            name = prefix + path.relative_to(folder).as_posix()
            if path.is_dir():
                if folder_entries:
                    handle.writestr(f"{name}/", b"")
            else:
                handle.write(path, name)
    return archive


def split_facts(labels: list[int], hashes: str = "t") -> SplitFacts:
    """A test split of `labels` whose images are `<hashes><i>`, and on which production's
    predictions are on file (its images are never decoded)."""
    return SplitFacts(
        split_hash="s1",
        data_hash="d1",
        classes=["cats", "dogs"],
        test_labels=labels,
        test_hashes=[f"{hashes}{i}" for i in range(len(labels))],
        seen_hashes=["a"],
        test_images=lambda side: None,
    )
