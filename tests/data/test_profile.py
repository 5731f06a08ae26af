"""The split's profile, where near-duplicates ended, and the data checks' figures."""

from __future__ import annotations

import numpy as np

from catdog.data import quality
from catdog.data.figures import (
    NEAR_DUPLICATES_FIGURE,
    PROFILE_FIGURE,
    SUSPECTS_FIGURE,
    save_profile_figures,
    save_suspects_figure,
)
from catdog.data.findings import Suspect
from catdog.data.profile import (
    LEFT_OUT,
    NOT_USED,
    GroupMember,
    near_duplicate_counts,
    place_near_duplicates,
    profile_rows,
    profile_split,
)
from catdog.data.records import ImageEntry, Manifest, SkippedFile
from tests.builders import write_image


def entry(path: str, split: str) -> ImageEntry:
    name = path.split("/")[1]
    return ImageEntry(path, int(name == "dogs"), name, "0" * 64, split, split)


IMAGES = (
    entry("train/cats/a.jpg", "train"),
    entry("train/cats/b.jpg", "train"),
    entry("train/dogs/c.jpg", "train"),
    entry("validation/cats/d.jpg", "validation"),
    entry("validation/dogs/e.jpg", "test"),
)


def manifest(root: str = "/images") -> Manifest:
    skipped = (
        SkippedFile("validation/cats/a-copy.jpg", "near-duplicate of train/cats/a.jpg"),
        SkippedFile("train/dogs/broken.jpg", "truncated image"),
    )
    return Manifest(root, "train_validation", ("cats", "dogs"), IMAGES, skipped)


def inspection(paths: tuple[str, ...]) -> quality.Inspection:
    values = np.arange(len(paths) * len(quality.PROPERTIES), dtype=np.float64)
    return quality.Inspection(
        paths=paths,
        values=values.reshape(len(paths), len(quality.PROPERTIES)) + 1,
        modes=("RGB", "L", "RGB", "RGB", "RGB")[: len(paths)],
        hashes=np.zeros((len(paths), len(quality.CROP_SCALES)), dtype=np.uint64),
    )


def test_the_profile_is_per_split_and_class_and_its_rows_give_the_medians():
    profile = profile_split(inspection(tuple(e.path for e in IMAGES)), manifest())
    assert profile["properties"] == list(quality.PROPERTIES)
    assert {split: sorted(classes) for split, classes in profile["splits"].items()} == {
        "train": ["cats", "dogs"],
        "validation": ["cats"],
        "test": ["dogs"],
    }
    cats = profile["splits"]["train"]["cats"]
    assert cats["count"] == 2 and cats["modes"] == {"L": 1, "RGB": 1}
    assert cats["width"]["median"] == (1 + 8) / 2  # a.jpg's and b.jpg's first property
    rows = profile_rows(profile)
    assert rows[0] == {
        "split": "train",
        "class": "cats",
        "images": 2,
        **{f"{name} (median)": cats[name]["median"] for name in quality.PROPERTIES},
        "modes": "L 1, RGB 1",
    }
    assert len(rows) == 4


def test_each_near_duplicate_is_placed_in_its_split_left_out_or_not_used():
    groups = [
        ["train/cats/a.jpg", "validation/cats/a-copy.jpg"],
        ["train/dogs/c.jpg", "validation/dogs/e.jpg", "train/dogs/broken.jpg"],
    ]
    placed = place_near_duplicates(manifest(), groups)
    assert placed == [
        [
            GroupMember(path="train/cats/a.jpg", split="train"),
            GroupMember(path="validation/cats/a-copy.jpg", split=LEFT_OUT),
        ],
        [
            GroupMember(path="train/dogs/c.jpg", split="train"),
            GroupMember(path="validation/dogs/e.jpg", split="test"),
            GroupMember(path="train/dogs/broken.jpg", split=NOT_USED),
        ],
    ]
    assert near_duplicate_counts(placed) == {"groups": 2, "images": 5, "across_splits": 1}
    assert near_duplicate_counts([]) == {"groups": 0, "images": 0, "across_splits": 0}


def test_the_figures_are_written_under_their_names(tmp_path):
    root = tmp_path / "images"
    for seed, image in enumerate(IMAGES):
        write_image(root / image.path, seed)
    split = manifest(str(root))
    facts = inspection(tuple(e.path for e in IMAGES))
    out = tmp_path / "out"
    out.mkdir()
    save_profile_figures(out, facts, split, [])
    assert sorted(p.name for p in out.iterdir()) == [PROFILE_FIGURE]  # no groups, no figure
    groups = place_near_duplicates(split, [["train/cats/a.jpg", "train/cats/b.jpg"]])
    save_profile_figures(out, facts, split, groups)
    assert sorted(p.name for p in out.iterdir()) == [NEAR_DUPLICATES_FIGURE, PROFILE_FIGURE]

    suspects = [
        Suspect(path=image.path, label=image.class_name, probability=0.1) for image in IMAGES
    ]
    assert save_suspects_figure(out, root, suspects) == out / SUSPECTS_FIGURE
    assert (out / SUSPECTS_FIGURE).stat().st_size > 0
