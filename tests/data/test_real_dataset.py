"""End to end on the real cats_and_dogs_filtered archive, when it is available."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from catdog.data.counts import count_labels
from catdog.data.extract import extract_archive
from catdog.data.manifest import build_manifest
from catdog.data.split import split_manifest

ARCHIVE = Path(__file__).resolve().parents[2].parent / "shared/data/cats_and_dogs_filtered.zip"

pytestmark = pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"{ARCHIVE} not present")


def test_real_dataset(tmp_path: Path) -> None:
    dest = extract_archive(ARCHIVE, tmp_path / "extracted")
    started = time.perf_counter()
    manifest = build_manifest(dest)
    elapsed = time.perf_counter() - started
    assert manifest.layout == "train_validation"
    assert manifest.classes == ("cats", "dogs")
    assert len(manifest.images) == 3000
    assert manifest.skipped == ()
    assert elapsed < 30, f"validating 3000 images took {elapsed:.1f}s"

    result = split_manifest(manifest, seed=1337)
    counts = count_labels(result)
    assert counts.counts == {
        "train": {"cats": 1000, "dogs": 1000},
        "validation": {"cats": 400, "dogs": 400},
        "test": {"cats": 100, "dogs": 100},
    }
    assert counts.baseline == {"train": 0.5, "validation": 0.5, "test": 0.5}
    split_of: dict[str, str | None] = {}
    for entry in result.images:
        assert split_of.setdefault(entry.sha256, entry.split) == entry.split
    assert split_manifest(manifest, seed=1337).content_hash() == result.content_hash()
    assert split_manifest(manifest, seed=1338).content_hash() != result.content_hash()
