"""The split's profile: the inspection summed up per split and class, and where each group of
near-duplicates ended (no Prefect import)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, TypedDict

from catdog.data import quality
from catdog.data.findings import GroupMember
from catdog.data.records import SPLITS, Manifest

LEFT_OUT = "left out"  # a near-duplicate the split left out of every split
NOT_USED = "not used"  # an image the manifest has not (skipped for another reason)


class NearDuplicateCounts(TypedDict):
    groups: int
    images: int
    across_splits: int  # groups with images in more than one split


def profile_split(inspection: quality.Inspection, manifest: Manifest) -> dict[str, Any]:
    """`quality.profile` per split and class of `manifest` (JSON, as profile.json holds it)."""
    by_group: dict[tuple[str, str], list[str]] = defaultdict(list)
    for entry in manifest.images:
        by_group[(entry.split or "", entry.class_name)].append(entry.path)
    return quality.profile(inspection, by_group)


def _where(manifest: Manifest) -> dict[str, str]:
    """Each image's split, and LEFT_OUT for near-duplicates the split left out."""
    where = {entry.path: entry.split or "" for entry in manifest.images}
    for skipped in manifest.skipped:
        if skipped.reason.startswith("near-duplicate of"):
            where[skipped.path] = LEFT_OUT
    return where


def place_near_duplicates(
    manifest: Manifest, groups: Sequence[Sequence[str]]
) -> list[list[GroupMember]]:
    """Each near-duplicate group's images (paths) with the split each ended in."""
    where = _where(manifest)
    return [
        [GroupMember(path=path, split=where.get(path, NOT_USED)) for path in group]
        for group in groups
    ]


def near_duplicate_counts(groups: Sequence[Sequence[GroupMember]]) -> NearDuplicateCounts:
    """How many groups and images, and how many groups straddle splits."""
    across = sum(
        len({member["split"] for member in group if member["split"] in SPLITS}) > 1
        for group in groups
    )
    return NearDuplicateCounts(
        groups=len(groups),
        images=sum(len(group) for group in groups),
        across_splits=across,
    )


def profile_rows(profile: dict[str, Any]) -> list[dict[str, Any]]:
    """The profile as table rows: one per split and class, the median of each property (a
    column per property: JSON rows for a table, not a fixed record)."""
    rows = []
    for split, classes in profile["splits"].items():
        for class_name, facts in classes.items():
            row: dict[str, Any] = {"split": split, "class": class_name, "images": facts["count"]}
            for name in profile["properties"]:
                row[f"{name} (median)"] = facts[name].get("median")
            row["modes"] = ", ".join(f"{m} {n}" for m, n in facts["modes"].items())
            rows.append(row)
    return rows
