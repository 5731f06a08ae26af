"""Assign every manifest image to train, validation or test, deterministically per seed."""

from __future__ import annotations

import hashlib
import logging
import math
from collections import defaultdict
from collections.abc import Sequence

from catdog.data.records import SPLITS, ImageEntry, Manifest, SkippedFile
from catdog.errors import DataError

logger = logging.getLogger(__name__)


def _order_key(seed: int, entry: ImageEntry) -> str:
    # A per-file hash instead of a shuffled RNG: the order depends only on the seed and the
    # file itself, not on how many files came before it or on the entries' order, so adding
    # one image does not reshuffle all the others.
    return hashlib.sha256(f"{seed}:{entry.sha256}:{entry.path}".encode()).hexdigest()


def _round_half_up(value: float) -> int:
    # Python's round() rounds halves to even (round(2.5) == 2), which surprises people
    # checking split sizes by hand.
    return math.floor(value + 0.5)


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be between 0 and 1 (exclusive), got {value}")


def _split_flat(
    class_name: str, ordered: Sequence[ImageEntry], fractions: tuple[float, float, float]
) -> dict[str, list[ImageEntry]]:
    n = len(ordered)
    if n < len(SPLITS):
        raise DataError(
            f"class {class_name!r} has {n} usable image(s); a folder without train/ and "
            f"validation/ needs at least {len(SPLITS)} per class to put one in each of "
            f"{', '.join(SPLITS)}"
        )
    _, f_val, f_test = fractions
    # At least one image per split (and per class), so every split can be evaluated; the
    # remaining images go to train.
    n_test = max(1, _round_half_up(n * f_test))
    n_val = max(1, _round_half_up(n * f_val))
    while n - n_test - n_val < 1:
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return {
        "test": list(ordered[:n_test]),
        "validation": list(ordered[n_test : n_test + n_val]),
        "train": list(ordered[n_test + n_val :]),
    }


def _split_validation(
    class_name: str, ordered: Sequence[ImageEntry], test_fraction: float
) -> tuple[list[ImageEntry], list[ImageEntry]]:
    """Hold out part of one class's validation images as test: (validation, test)."""
    n = len(ordered)
    if n < 2:
        raise DataError(
            f"class {class_name!r} has {n} usable image(s) in validation/; at least 2 are "
            "needed to hold out a test set and keep a validation set"
        )
    # Small classes still get one test and one validation image rather than an empty split.
    n_test = min(n - 1, max(1, _round_half_up(n * test_fraction)))
    return list(ordered[n_test:]), list(ordered[:n_test])


def _fixed_by_folders(layout: str, entry: ImageEntry) -> bool:
    """Whether the dataset's own folders fix this image's split (catdog cannot move it)."""
    if layout == "train_validation_test":
        return True
    return layout == "train_validation" and entry.source_split == "train"


def keep_groups_together(
    layout: str,
    entries: dict[str, ImageEntry],
    split_of: dict[str, str],
    groups: Sequence[Sequence[str]],
) -> list[SkippedFile]:
    """Make every near-duplicate group sit in one split; `split_of` (path -> split) is
    updated in place, and the images left out are returned.

    Where catdog makes the split, a group moves as one unit to the earliest split one of its
    members is in (train, then validation, then test): copies leave the test split rather than
    gather in it, and a model trained before this rule never finds its training images in a
    test split. Where the dataset's folders fix the split, the group stays where its first
    fixed member is, and copies elsewhere (a training image's copy in validation or test) are
    left out. A move that would leave a class without images in a split is not made; the group
    then still straddles splits, which the profile counts.
    """
    left_out: list[SkippedFile] = []
    rank = {split: index for index, split in enumerate(SPLITS)}
    sizes: dict[tuple[str, str], int] = defaultdict(int)
    for path, split in split_of.items():
        sizes[(split, entries[path].class_name)] += 1
    for group in groups:
        members = sorted(
            (entries[path] for path in group if path in entries),
            key=lambda entry: (rank[split_of[entry.path]], entry.path),
        )
        if len({split_of[entry.path] for entry in members}) < 2:
            continue
        fixed = [entry for entry in members if _fixed_by_folders(layout, entry)]
        keeper = fixed[0] if fixed else members[0]
        target = split_of[keeper.path]
        moving = [entry for entry in members if split_of[entry.path] != target]
        taken: dict[tuple[str, str], int] = defaultdict(int)
        for entry in moving:
            taken[(split_of[entry.path], entry.class_name)] += 1
        if any(sizes[key] <= count for key, count in taken.items()):
            logger.warning(
                "near-duplicates %s kept where they are: moving them would leave a class "
                "without images in a split",
                ", ".join(entry.path for entry in members),
            )
            continue
        for entry in moving:
            sizes[(split_of[entry.path], entry.class_name)] -= 1
            if fixed:  # the folders fix where it is: a copy of an earlier split's image goes
                left_out.append(
                    SkippedFile(entry.path, f"near-duplicate of {keeper.path} ({target})")
                )
                del split_of[entry.path]
            else:
                split_of[entry.path] = target
                sizes[(target, entry.class_name)] += 1
    return left_out


def split_manifest(
    manifest: Manifest,
    *,
    seed: int,
    test_fraction: float = 0.2,
    flat_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    max_images_per_class: int | None = None,
    near_duplicates: Sequence[Sequence[str]] = (),
) -> Manifest:
    """Assign each image a split, deterministically for a given seed and manifest content.

    Each class's files are ordered by `sha256(f"{seed}:{sha256}:{path}")`, so the result does
    not depend on the entries' order or on where the dataset is stored. Layouts:

    - "train_validation": train/ is train; per class, `round(n * test_fraction)` of the
      validation/ files (at least 1, and leaving at least 1) go to test, the rest stay in
      validation.
    - "train_validation_test": the folders' splits are kept as they are.
    - "single_root": per class, `flat_fractions` (train, validation, test) with at least one
      image in every split; test and validation sizes are rounded, train takes the rest.

    Args:
        manifest: Manifest from `build_manifest`; existing `split` values are recomputed.
        seed: Seed of the ordering.
        test_fraction: Share of each class's validation/ files held out as test.
        flat_fractions: Train, validation and test shares for a single-root dataset.
        max_images_per_class: Keep at most this many images per split and class (the first
            in the seeded order); the rest are dropped from the manifest. None keeps all.
        near_duplicates: Groups of near-identical images (paths); each ends in one split
            (see `keep_groups_together`), copies left out are listed in `skipped`.

    Returns:
        A manifest whose images all have `split` set, sorted by path, with `split_settings`.

    Raises:
        ValueError: A fraction is outside (0, 1), the flat fractions do not sum to 1, or the
            cap is below 1.
        DataError: A class has no usable images in a split: it has no images at all, too few
            to fill every split, or a split folder's copy of it is empty after skipping.
    """
    _check_fraction("test_fraction", test_fraction)
    if len(flat_fractions) != 3:
        raise ValueError(f"flat_fractions needs 3 values (train, val, test), got {flat_fractions}")
    fractions = (float(flat_fractions[0]), float(flat_fractions[1]), float(flat_fractions[2]))
    for name, value in zip(SPLITS, fractions, strict=True):
        _check_fraction(f"flat_fractions[{name}]", value)
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"flat_fractions must sum to 1, got {flat_fractions}")
    if max_images_per_class is not None and max_images_per_class < 1:
        raise ValueError(f"max_images_per_class must be at least 1, got {max_images_per_class}")

    by_source: dict[tuple[str | None, str], list[ImageEntry]] = defaultdict(list)
    for entry in manifest.images:
        by_source[(entry.source_split, entry.class_name)].append(entry)
    for group in by_source.values():
        group.sort(key=lambda entry: _order_key(seed, entry))

    proposed: dict[tuple[str, str], list[ImageEntry]] = {}
    placed = 0
    for class_name in manifest.classes:
        if manifest.layout == "single_root":
            parts = _split_flat(class_name, by_source[(None, class_name)], fractions)
        elif manifest.layout == "train_validation":
            validation, test = _split_validation(
                class_name, by_source[("validation", class_name)], test_fraction
            )
            parts = {
                "train": by_source[("train", class_name)],
                "validation": validation,
                "test": test,
            }
        elif manifest.layout == "train_validation_test":
            parts = {split: by_source[(split, class_name)] for split in SPLITS}
        else:
            raise DataError(
                f"manifest of {manifest.root} has an unknown layout {manifest.layout!r}"
            )
        for split in SPLITS:
            proposed[(split, class_name)] = parts[split]
            placed += len(parts[split])

    if placed != len(manifest.images):
        # Entries whose class or source folder does not fit the layout would vanish silently.
        raise DataError(
            f"manifest of {manifest.root} is inconsistent: {len(manifest.images) - placed} "
            f"image(s) have a class or source split that does not match layout {manifest.layout!r}"
        )

    split_of = {entry.path: split for (split, _), part in proposed.items() for entry in part}
    left_out = keep_groups_together(
        manifest.layout,
        {entry.path: entry for entry in manifest.images},
        split_of,
        near_duplicates,
    )
    assigned: dict[tuple[str, str], list[ImageEntry]] = {}
    for class_name in manifest.classes:
        ordered = sorted(
            (e for e in manifest.images if e.class_name == class_name and e.path in split_of),
            key=lambda entry: _order_key(seed, entry),
        )
        for split in SPLITS:
            entries = [entry for entry in ordered if split_of[entry.path] == split]
            # Every class must be present in every split: a model never trained on a class,
            # or a metric computed without it, is silently wrong rather than merely noisy.
            if not entries:
                raise DataError(
                    f"class {class_name!r} has no usable images in the {split} split of "
                    f"{manifest.root} (all missing, skipped or duplicates); add images or "
                    "remove the class"
                )
            if max_images_per_class is not None:
                entries = entries[:max_images_per_class]
            assigned[(split, class_name)] = entries

    images = sorted(
        (
            ImageEntry(
                path=entry.path,
                label=entry.label,
                class_name=entry.class_name,
                sha256=entry.sha256,
                source_split=entry.source_split,
                split=split,
            )
            for (split, _), entries in assigned.items()
            for entry in entries
        ),
        key=lambda entry: entry.path,
    )
    settings = {
        "seed": seed,
        "test_fraction": test_fraction,
        "flat_fractions": list(fractions),
        "max_images_per_class": max_images_per_class,
    }
    logger.info(
        "split %d images (seed %d): %s",
        len(images),
        seed,
        ", ".join(f"{s} {sum(1 for i in images if i.split == s)}" for s in SPLITS),
    )
    if left_out:
        logger.warning(
            "%d near-duplicate(s) of images in an earlier split left out (first: %s: %s)",
            len(left_out),
            left_out[0].path,
            left_out[0].reason,
        )
    skipped = tuple(sorted((*manifest.skipped, *left_out), key=lambda entry: entry.path))
    return manifest.with_images(images, split_settings=settings, skipped=skipped)
