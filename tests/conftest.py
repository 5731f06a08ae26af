"""Shared fixtures: a Prefect test API, and small generated image datasets as real files."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# As flows/train_flow.py: library lines logged outside a flow run stay in the terminal.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_ZIP = SHARED / "data" / "cats_and_dogs_filtered.zip"
REAL_WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5"


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """Prefect's real engine and API, on a throwaway database."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 30), bright: bool = False):
    """A small real JPEG whose content depends on `seed` (so hashes differ)."""
    rng = np.random.default_rng(seed)
    base = 170 if bright else 40
    pixels = rng.integers(0, 80, (size[1], size[0], 3), dtype=np.uint8) + base
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, format="JPEG", quality=90)
    return path


def make_dataset(
    root: Path,
    *,
    train: int = 12,
    validation: int = 10,
    classes: tuple[str, ...] = ("cats", "dogs"),
    seed: int = 0,
) -> Path:
    """`root/{train,validation}/<class>/*.jpg`, classes told apart by brightness."""
    counter = seed * 100_000
    for split, count in (("train", train), ("validation", validation)):
        for index, name in enumerate(classes):
            for i in range(count):
                counter += 1
                write_image(
                    root / split / name / f"{name}.{split}.{i}.jpg", counter, bright=index % 2 == 1
                )
    return root


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.rglob("*")):
            handle.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


@pytest.fixture
def dataset_zip(tmp_path: Path) -> Path:
    """The official layout in miniature, nested one level down as in the real archive."""
    folder = make_dataset(tmp_path / "src")
    return zip_folder(folder, tmp_path / "tiny.zip", prefix="tiny_filtered/")
