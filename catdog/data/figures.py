"""The data checks' figures, drawn from the images they name and written under the names
below, which the report reads (no Prefect import)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from catdog.data import quality
from catdog.data.findings import GroupMember, Suspect
from catdog.data.records import SPLITS, ImageEntry, Manifest

PROFILE_FIGURE = "profile.png"
NEAR_DUPLICATES_FIGURE = "near_duplicates.png"
SUSPECTS_FIGURE = "suspects.png"

THUMBNAIL_SIDE = 96
SHOWN_GROUPS = 10  # near-duplicate groups, a row each
SHOWN_IN_GROUP = 4
SHOWN_SUSPECTS = 12  # in two rows of 6


def thumbnail(root: Path, path: str) -> np.ndarray:
    """Image `path` (relative to `root`) as RGB, at most THUMBNAIL_SIDE on its longer side."""
    with Image.open(root / path) as image:
        # A JPEG decodes at a fraction of its size straight away (DCT scaling), no smaller
        # than the thumbnail: a figure of 40 thumbnails then costs a tenth of full decodes.
        image.draft("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        return np.asarray(image)


def _shown_groups(groups: Sequence[Sequence[GroupMember]]) -> list[Sequence[GroupMember]]:
    return [group[:SHOWN_IN_GROUP] for group in groups[:SHOWN_GROUPS]]


def profile_figure_paths(groups: Sequence[Sequence[GroupMember]]) -> list[str]:
    """The images `save_profile_figures` shows (paths relative to the manifest's root)."""
    return [member["path"] for group in _shown_groups(groups) for member in group]


def suspects_figure_paths(suspects: Sequence[Suspect]) -> list[str]:
    """The images `save_suspects_figure` shows (paths relative to its root)."""
    return [suspect["path"] for suspect in suspects[:SHOWN_SUSPECTS]]


def shown_entries(manifest: Manifest, paths: Sequence[str]) -> list[ImageEntry]:
    """The manifest's entries of `paths`."""
    wanted = set(paths)
    return [entry for entry in manifest.images if entry.path in wanted]


def save_profile_figures(
    folder: Path,
    inspection: quality.Inspection,
    manifest: Manifest,
    groups: Sequence[Sequence[GroupMember]],
) -> None:
    """Write PROFILE_FIGURE (every property's histogram, splits overlaid) into `folder`, and
    NEAR_DUPLICATES_FIGURE (the first groups' images) when there are near-duplicates."""
    from catdog.plots import property_histograms, save_figure, thumbnail_rows

    values = {name: inspection.rows(e.path for e in manifest.in_split(name)) for name in SPLITS}
    save_figure(property_histograms(values, quality.PROPERTIES), folder / PROFILE_FIGURE)
    if not groups:
        return
    root = Path(manifest.root)
    rows = [
        [
            (thumbnail(root, member["path"]), f"{member['path']}\n({member['split']})")
            for member in group
        ]
        for group in _shown_groups(groups)
    ]
    save_figure(
        thumbnail_rows(rows, "Near-duplicate groups: each row is one group"),
        folder / NEAR_DUPLICATES_FIGURE,
    )


def save_suspects_figure(folder: Path, root: Path, suspects: Sequence[Suspect]) -> Path:
    """Write SUSPECTS_FIGURE into `folder`: the first suspects (image paths relative to
    `root`), each captioned with its label and the probe's probability of it."""
    from catdog.plots import save_figure, thumbnail_rows

    shown = [
        (
            thumbnail(root, suspect["path"]),
            f"{Path(suspect['path']).name}\n{suspect['label']} p={suspect['probability']:.2f}",
        )
        for suspect in suspects[:SHOWN_SUSPECTS]
    ]
    half = SHOWN_SUSPECTS // 2
    return save_figure(
        thumbnail_rows(
            [shown[:half], shown[half:]] if len(shown) > half else [shown],
            "Suspect labels: the probe's probability of the given label",
        ),
        folder / SUSPECTS_FIGURE,
    )
