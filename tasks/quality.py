"""Data-check tasks: inspect every image, profile the split, find suspect labels, and compare
this run's data with the data that trained production."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from prefect import get_run_logger

from catdog.data import quality
from catdog.data.records import SPLITS, Manifest
from catdog.errors import DataCheckFailed
from catdog.layout import Layout
from catdog.stage_records import (
    DataChecksRecord,
    FeaturesRecord,
    InspectionRecord,
    ManifestRecord,
    ProfileRecord,
    SplitRecord,
    SuspectsRecord,
)
from catdog.registry import archive_file
from catdog.registry import read as read_registry
from tasks import ui
from tasks.caching import stage_output, stage_task
from tasks.data import manifest_of, near_duplicates_of, split_manifest_of
from tasks.events import emit_run_event

THUMBNAIL_SIDE = 96
SHOWN_GROUPS = 10  # near-duplicate groups in the report's figure
SHOWN_SUSPECTS = 12
LISTED_SUSPECTS = 20
# Kept with a promoted model: what the next runs' data is compared with.
REFERENCE_FILE = "reference.npz"
FEATURES_SAMPLE_FILE = "features_sample.npz"


@stage_task("inspect")
def inspect_images(manifest: ManifestRecord, artifacts: str) -> InspectionRecord:
    """Every image's size, colour, brightness, contrast and file size, and its perceptual
    hashes; groups of near-identical images."""
    layout = Layout.at(artifacts)
    with stage_output(layout) as out:
        images = manifest_of(layout, manifest)
        paths = [entry.path for entry in images.images]
        inspection = quality.inspect_images(Path(images.root), paths)
        inspection.save(out.folder / "inspection.npz")
        groups = quality.near_duplicate_groups(inspection.hashes, quality.NEAR_DUPLICATE_BITS)
        named = [[paths[i] for i in group] for group in groups]
        (out.folder / "near_duplicates.json").write_text(json.dumps(named, indent=1))
        out.facts.update(
            images=len(paths),
            near_duplicate_groups=len(named),
            near_duplicate_images=sum(len(group) for group in named),
            max_bits=quality.NEAR_DUPLICATE_BITS,
        )
    if named:
        get_run_logger().info(
            "%d near-duplicate group(s) of %d images (first: %s)",
            len(named),
            sum(len(group) for group in named),
            ", ".join(named[0]),
        )
    return out.record


def _thumbnail(root: Path, path: str) -> np.ndarray:
    with Image.open(root / path) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        return np.asarray(image)


def _where(manifest: Manifest) -> dict[str, str]:
    """Each image's split, and "left out" for near-duplicates the split left out."""
    where = {entry.path: entry.split or "" for entry in manifest.images}
    for skipped in manifest.skipped:
        if skipped.reason.startswith("near-duplicate of"):
            where[skipped.path] = "left out"
    return where


@stage_task("profile")
def profile_data(split: SplitRecord, inspection: InspectionRecord, artifacts: str) -> ProfileRecord:
    """Per split and class: the count and every image property's distribution; where the
    near-duplicate groups ended; the training split's properties, kept as a reference when a
    model trained on them is promoted."""
    from catdog.plots import property_histograms, save_figure, thumbnail_rows

    layout = Layout.at(artifacts)
    with stage_output(layout) as out:
        manifest = split_manifest_of(layout, split)
        facts = quality.Inspection.load(layout.resolve(inspection.dir) / "inspection.npz")
        by_group: dict[tuple[str, str], list[str]] = defaultdict(list)
        for entry in manifest.images:
            by_group[(entry.split or "", entry.class_name)].append(entry.path)
        profile = quality.profile(facts, by_group)
        (out.folder / "profile.json").write_text(json.dumps(profile, indent=1))
        train = manifest.in_split("train")
        with (out.folder / REFERENCE_FILE).open("wb") as handle:
            np.savez(
                handle,
                properties=facts.rows(entry.path for entry in train),
                classes=np.array(manifest.classes, dtype=str),
                counts=np.array([sum(e.class_name == c for e in train) for c in manifest.classes]),
            )
        save_figure(
            property_histograms(
                {name: facts.rows(e.path for e in manifest.in_split(name)) for name in SPLITS},
                quality.PROPERTIES,
            ),
            out.folder / "profile.png",
        )
        where = _where(manifest)
        groups = [
            [{"path": path, "split": where.get(path, "not used")} for path in group]
            for group in near_duplicates_of(layout, inspection)
        ]
        across = sum(
            len({m["split"] for m in group if m["split"] in SPLITS}) > 1 for group in groups
        )
        if groups:
            root = Path(manifest.root)
            rows = [
                [(_thumbnail(root, m["path"]), f"{m['path']}\n({m['split']})") for m in group[:4]]
                for group in groups[:SHOWN_GROUPS]
            ]
            save_figure(
                thumbnail_rows(rows, "Near-duplicate groups: each row is one group"),
                out.folder / "near_duplicates.png",
            )
        out.facts.update(
            near_duplicates={
                "groups": len(groups),
                "images": sum(len(group) for group in groups),
                "across_splits": across,
            },
            groups=groups[:50],
        )
    ui.publish_table(
        "data-profile",
        profile_rows(profile),
        "Images per split and class, with the median of each property",
    )
    return out.record


def profile_rows(profile: dict[str, Any]) -> list[dict[str, Any]]:
    """The profile as table rows: one per split and class, the median of each property."""
    rows = []
    for split, classes in profile["splits"].items():
        for class_name, facts in classes.items():
            row: dict[str, Any] = {"split": split, "class": class_name, "images": facts["count"]}
            for name in profile["properties"]:
                row[f"{name} (median)"] = facts[name].get("median")
            row["modes"] = ", ".join(f"{m} {n}" for m, n in facts["modes"].items())
            rows.append(row)
    return rows


@stage_task("suspects")
def find_suspect_labels(
    split: SplitRecord, features: FeaturesRecord, about: str, seed: int, artifacts: str
) -> SuspectsRecord:
    """Training images whose label a cross-validated linear probe on the cached features
    disagrees with most, lowest probability of their own label first; and a sample of the
    features, kept as a reference when a model trained on them is promoted."""
    from catdog.plots import save_figure, thumbnail_rows

    layout = Layout.at(artifacts)
    with stage_output(layout) as out:
        manifest = split_manifest_of(layout, split)
        train = manifest.in_split("train")  # the features' row order (decode_split_to)
        folder = layout.resolve(features.dir)
        rows = np.load(folder / "train.npy", mmap_mode="r")[0]  # view 0: the image as is
        labels = np.load(folder / "y_train.npy")
        sample = quality.sample_rows(rows, quality.EMBEDDING_SAMPLE, seed)
        with (out.folder / FEATURES_SAMPLE_FILE).open("wb") as handle:
            np.savez(handle, rows=sample.astype(np.float32), about=np.array(about))
        suspects: list[dict[str, Any]] = []
        smallest = min(np.bincount(labels, minlength=len(manifest.classes)))
        if smallest >= 2:
            probability = quality.out_of_fold_label_probability(
                np.asarray(rows), labels, len(manifest.classes), folds=min(5, smallest), seed=seed
            )
            for i in np.argsort(probability, kind="stable")[:LISTED_SUSPECTS]:
                suspects.append(
                    {
                        "path": train[i].path,
                        "label": train[i].class_name,
                        "probability": round(float(probability[i]), 4),
                    }
                )
            root = Path(manifest.root)
            shown = [
                (
                    _thumbnail(root, s["path"]),
                    f"{Path(s['path']).name}\n{s['label']} p={s['probability']:.2f}",
                )
                for s in suspects[:SHOWN_SUSPECTS]
            ]
            save_figure(
                thumbnail_rows(
                    [shown[:6], shown[6:]] if len(shown) > 6 else [shown],
                    "Suspect labels: the probe's probability of the given label",
                ),
                out.folder / "suspects.png",
            )
        out.facts.update(suspects=suspects, features=about)
    return out.record


def _counts(reference: Any) -> dict[str, int]:
    return {str(c): int(n) for c, n in zip(reference["classes"], reference["counts"], strict=True)}


def _reference(layout: Layout) -> tuple[str | None, dict[str, Path], str]:
    """Production's archive, its reference files, and why there is none."""
    production = read_registry(layout).production
    if production is None:
        return None, {}, "no production model yet: nothing to compare this run's data with"
    archive = production.archive
    files = {
        name: archive_file(layout, archive, name)
        for name in (REFERENCE_FILE, FEATURES_SAMPLE_FILE)
        if archive_file(layout, archive, name).is_file()
    }
    if REFERENCE_FILE not in files:
        return (
            archive,
            {},
            f"production ({production.model}) was promoted without a data reference",
        )
    return archive, files, ""


@stage_task("check")
def check_data(
    profile: ProfileRecord,
    suspects: SuspectsRecord | None,
    on_data_issue: str,
    seed: int,
    artifacts: str,
) -> DataChecksRecord:
    """This run's training data against the data that trained production: class balance,
    every image property and the feature embeddings. Each failed check emits
    `catdog.data.check.failed`; with `on_data_issue="stop"` a failure stops the run."""
    logger = get_run_logger()
    layout = Layout.at(artifacts)
    archive, files, note = _reference(layout)
    checks: list[quality.DataCheck] = []
    if files:
        with (
            np.load(files[REFERENCE_FILE]) as reference,
            np.load(layout.resolve(profile.dir) / REFERENCE_FILE) as current,
        ):
            checks.append(quality.class_balance(_counts(reference), _counts(current)))
            for k, name in enumerate(quality.PROPERTIES):
                checks.append(
                    quality.property_drift(
                        name, reference["properties"][:, k], current["properties"][:, k]
                    )
                )
        if suspects is None:
            note = "no cached features in this run: the embeddings were not compared"
        elif FEATURES_SAMPLE_FILE not in files:
            note = "production's reference has no features: the embeddings were not compared"
        else:
            with (
                np.load(files[FEATURES_SAMPLE_FILE]) as reference,
                np.load(layout.resolve(suspects.dir) / FEATURES_SAMPLE_FILE) as current,
            ):
                if str(reference["about"]) != str(current["about"]):
                    note = (
                        f"production's features ({reference['about']}) and this run's "
                        f"({current['about']}) differ: the embeddings were not compared"
                    )
                else:
                    checks.append(
                        quality.embedding_drift(reference["rows"], current["rows"], seed=seed)
                    )
    record = DataChecksRecord(
        checks=[check.to_json() for check in checks],
        reference=archive if files else None,
        note=note,
        policy=on_data_issue,
    )
    if note:
        logger.info("data checks: %s", note)
    if checks:
        ui.publish_table(
            "data-checks",
            [check.to_json() for check in checks],
            f"This run's training data against production's ({archive})",
        )
    for check in record.failed:
        logger.warning("data check %s failed: %s", check["name"], check["detail"])
        _announce(layout, check, on_data_issue)
    if record.failed and on_data_issue == "stop":
        names = ", ".join(check["name"] for check in record.failed)
        raise DataCheckFailed(
            f"data checks failed against production's training data ({names}; "
            f"{record.failed[0]['detail']}); --on-data-issue stop: nothing trained, production "
            "kept"
        )
    return record


def _announce(layout: Layout, check: dict[str, Any], policy: str) -> None:
    emit_run_event(
        "catdog.data.check.failed",
        f"catdog.data.{layout.root}",
        f"catdog data checks in {layout.root}",
        {"check": check["name"], **check, "policy": policy, "artifacts": str(layout.root)},
    )
