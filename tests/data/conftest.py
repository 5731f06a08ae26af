"""Factories for small, real image-folder datasets and their zip archives."""

from __future__ import annotations

import itertools
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Which split folders each layout has; "val" shows the validation alias.
LAYOUT_SPLITS = {
    "train_validation": ("train", "validation"),
    "train_val": ("train", "val"),
    "train_validation_test": ("train", "validation", "test"),
    "single_root": (None,),
}

_counter = itertools.count()


def write_image(
    path: Path,
    *,
    fmt: str = "JPEG",
    mode: str = "RGB",
    size: tuple[int, int] = (40, 30),
    seed: int | None = None,
) -> Path:
    """Write a random-noise image; each call without `seed` gives different content."""
    rng = np.random.default_rng(next(_counter) if seed is None else seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)
    return path


def make_dataset(
    parent: Path,
    *,
    name: str = "dataset",
    layout: str = "train_validation",
    classes: tuple[str, ...] = ("cats", "dogs"),
    n: int | Mapping[str | None, int] = 3,
) -> Path:
    """Create `parent/name/` holding a dataset; `n` is per class, or per split folder name."""
    root = parent / name
    for split in LAYOUT_SPLITS[layout]:
        count = n if isinstance(n, int) else n[split]
        for class_name in classes:
            folder = root / split / class_name if split else root / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                write_image(folder / f"{class_name}.{index}.jpg")
    return root


def zip_folder(folder: Path, archive: Path, *, arc_prefix: str | None = None) -> Path:
    """Zip `folder` with folder entries, names starting with `folder.name/` (or the prefix)."""
    prefix = folder.name if arc_prefix is None else arc_prefix
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        if prefix:
            zf.writestr(f"{prefix}/", b"")
        for path in sorted(folder.rglob("*")):
            name = "/".join(filter(None, [prefix, path.relative_to(folder).as_posix()]))
            if path.is_dir():
                zf.writestr(f"{name}/", b"")
            else:
                zf.write(path, name)
    return archive


def tree(folder: Path) -> list[str]:
    """Every path under `folder`, relative and sorted (to prove nothing else appeared)."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))


@pytest.fixture
def image_writer() -> Callable[..., Path]:
    return write_image


@pytest.fixture
def dataset_factory(tmp_path: Path) -> Callable[..., Path]:
    """make_dataset with `parent` defaulting to a fresh folder under tmp_path."""

    def factory(parent: Path | None = None, **kwargs: object) -> Path:
        return make_dataset(parent or tmp_path / "src", **kwargs)  # type: ignore[arg-type]

    return factory


@pytest.fixture
def zipper() -> Callable[..., Path]:
    return zip_folder


@pytest.fixture
def tree_of() -> Callable[[Path], list[str]]:
    return tree


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(archive folder, dest parent) with a file already in the parent, to spot leftovers."""
    archives = tmp_path / "archives"
    archives.mkdir()
    parent = tmp_path / "out"
    parent.mkdir()
    (parent / "already-here.txt").write_text("keep me")
    yield archives, parent
