"""Fixtures over the suite's builders (tests/builders.py) for the data layer's tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.builders import make_dataset, write_image, zip_folder


def tree(folder: Path) -> list[str]:
    """Every path under `folder`, relative and sorted (to prove nothing else appeared)."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))


@pytest.fixture
def image_writer() -> Callable[..., Path]:
    return write_image


@pytest.fixture
def dataset_factory(tmp_path: Path) -> Callable[..., Path]:
    """make_dataset into `parent/name` (parent: a fresh folder under tmp_path), `n` images
    per class (3 by default)."""

    def factory(
        parent: Path | None = None, *, name: str = "dataset", n: object = 3, **kwargs: object
    ) -> Path:
        return make_dataset((parent or tmp_path / "src") / name, n=n, **kwargs)  # type: ignore[arg-type]

    return factory


@pytest.fixture
def zipper() -> Callable[..., Path]:
    """zip_folder as zip tools write a folder: its name first, and a member per folder."""

    def zipper(folder: Path, archive: Path, *, arc_prefix: str | None = None) -> Path:
        prefix = folder.name if arc_prefix is None else arc_prefix
        return zip_folder(folder, archive, f"{prefix}/" if prefix else "", folder_entries=True)

    return zipper


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
