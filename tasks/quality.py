"""Data-check tasks: inspect every image, profile the split, find suspect labels, and compare
this run's data with the data that trained production."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger

from catdog.data import quality
from catdog.data.figures import (
    profile_figure_paths,
    save_profile_figures,
    save_suspects_figure,
    shown_entries,
    suspects_figure_paths,
)
from catdog.data.profile import (
    near_duplicate_counts,
    place_near_duplicates,
    profile_rows,
    profile_split,
)
from catdog.data.reference import (
    FEATURES_SAMPLE_FILE,
    REFERENCE_FILE,
    Comparison,
    ReferenceFiles,
    compare_with_production,
    write_features_sample,
    write_reference,
)
from catdog.data.suspects import label_probabilities, rank_suspects
from catdog.errors import DataCheckFailed
from catdog.features import unaugmented_train_features
from catdog.hashing import HashMemo
from catdog.layout import INSPECTION_FILE, NEAR_DUPLICATES_FILE, Layout
from catdog.mirror import fetch_inputs, pull_production
from catdog.pieces import Reuse, inspection_pieces
from catdog.registry import archive_file
from catdog.registry import read as read_registry
from catdog.stage_records import (
    DataChecksRecord,
    FeaturesRecord,
    InspectionRecord,
    ManifestRecord,
    ProfileRecord,
    SplitRecord,
    SuspectsRecord,
)
from tasks import ui
from tasks.caching import stage_output, stage_task
from tasks.data import fetch_images, manifest_of, near_duplicates_of, split_manifest_of
from tasks.events import emit_run_event

# The near-duplicate links a run found, kept beside the inspection's pieces: a later run
# compares only its new images with the rest.
NEAR_DUPLICATE_LINKS = "near-duplicate-links"


@stage_task("inspect")
def inspect_images(manifest: ManifestRecord, artifacts: str) -> InspectionRecord:
    """Every image's size, colour, brightness, contrast and file size, and its perceptual
    hashes; groups of near-identical images."""
    layout = Layout.at(artifacts)
    store = inspection_pieces(layout.pieces_dir, HashMemo(layout.hash_memo))
    known = store.values()
    with stage_output(layout) as out:
        images = manifest_of(layout, manifest)
        fetch_images(layout, manifest, [e for e in images.images if e.sha256 not in known])
        paths = [entry.path for entry in images.images]
        keys = [entry.sha256 for entry in images.images]
        inspection = quality.inspect_images(
            Path(images.root), paths, keys=keys, known=known, keep=store.add_values
        )
        reused = sum(1 for key in keys if key in known)
        inspection.save(out.folder / INSPECTION_FILE)
        bits = quality.NEAR_DUPLICATE_BITS
        links, compared = quality.incremental_links(
            inspection.hashes, keys, bits, store.notes(NEAR_DUPLICATE_LINKS)
        )
        store.add_note(
            NEAR_DUPLICATE_LINKS,
            {
                "compared": keys,
                "links": sorted([keys[i], keys[j]] for i, j in links),
                "max_bits": bits,
            },
        )
        groups = quality.groups_of(len(keys), links)
        named = [[paths[i] for i in group] for group in groups]
        (out.folder / NEAR_DUPLICATES_FILE).write_text(json.dumps(named, indent=1))
        out.facts.update(
            images=len(paths),
            near_duplicate_groups=len(named),
            near_duplicate_images=sum(len(group) for group in named),
            max_bits=bits,
            per_image=Reuse(len(keys) - reused, reused).to_json(),
            near_duplicates_compared=compared,
            pieces=[layout.relative(store.folder)],
        )
    if named:
        get_run_logger().info(
            "%d near-duplicate group(s) of %d images (first: %s)",
            len(named),
            sum(len(group) for group in named),
            ", ".join(named[0]),
        )
    return out.record


@stage_task("profile")
def profile_data(split: SplitRecord, inspection: InspectionRecord, artifacts: str) -> ProfileRecord:
    """Per split and class: the count and every image property's distribution; where the
    near-duplicate groups ended; the training split's properties, kept as a reference when a
    model trained on them is promoted."""
    layout = Layout.at(artifacts)
    with stage_output(layout) as out:
        manifest = split_manifest_of(layout, split)
        facts = quality.Inspection.load(layout.resolve(inspection.dir) / INSPECTION_FILE)
        profile = profile_split(facts, manifest)
        (out.folder / "profile.json").write_text(json.dumps(profile, indent=1))
        write_reference(out.folder, facts, manifest)
        groups = place_near_duplicates(manifest, near_duplicates_of(layout, inspection))
        fetch_images(layout, split, shown_entries(manifest, profile_figure_paths(groups)))
        save_profile_figures(out.folder, facts, manifest, groups)
        out.facts.update(near_duplicates=near_duplicate_counts(groups), groups=groups[:50])
    ui.publish_table(
        "data-profile",
        profile_rows(profile),
        "Images per split and class, with the median of each property",
    )
    return out.record


@stage_task("suspects")
def find_suspect_labels(
    split: SplitRecord, features: FeaturesRecord, about: str, seed: int, artifacts: str
) -> SuspectsRecord:
    """Training images whose label a cross-validated linear probe on the cached features
    disagrees with most, lowest probability of their own label first; and a sample of the
    features, kept as a reference when a model trained on them is promoted. Images an earlier
    run scored keep their probabilities (catdog.data.suspects)."""
    layout = Layout.at(artifacts)
    with stage_output(layout) as out:
        manifest = split_manifest_of(layout, split)
        rows, labels = unaugmented_train_features(layout.resolve(features.dir))
        write_features_sample(out.folder, rows, about, seed)
        # The features' rows follow the training split's order (decode_splits_to).
        train = manifest.in_split("train")
        scores = label_probabilities(
            rows,
            labels,
            [entry.sha256 for entry in train],
            len(manifest.classes),
            seed=seed,
            pieces=layout.pieces_dir,
            # The classes by name: a probability kept for one class is not another's.
            features_made_by={
                "features": features.pieces[:1] or features.key,
                "classes": list(manifest.classes),
            },
            memo=HashMemo(layout.hash_memo),
        )
        suspects = rank_suspects(scores.own, train) if scores else []
        if suspects:
            fetch_images(layout, split, shown_entries(manifest, suspects_figure_paths(suspects)))
            save_suspects_figure(out.folder, Path(manifest.root), suspects)
        out.facts.update(suspects=suspects, features=about)
        if scores:
            out.facts.update(
                per_image=scores.reuse.to_json(),
                cross_validated=scores.cross_validated,
                pieces=[layout.relative(folder) for folder in scores.folders],
            )
    return out.record


def _production_reference(layout: Layout) -> tuple[str | None, ReferenceFiles | None, str]:
    """Production's archive and the reference kept with it, or why there is none."""
    production = read_registry(layout).production
    if production is None:
        return None, None, "no production model yet: nothing to compare this run's data with"
    properties = archive_file(layout, production.archive, REFERENCE_FILE)
    if not properties.is_file():
        note = f"production ({production.model}) was promoted without a data reference"
        return None, None, note
    features = archive_file(layout, production.archive, FEATURES_SAMPLE_FILE)
    return (
        production.archive,
        ReferenceFiles(properties, features if features.is_file() else None),
        "",
    )


def _this_run(
    layout: Layout, profile: ProfileRecord, suspects: SuspectsRecord | None
) -> ReferenceFiles:
    """The reference this run keeps if its model is promoted."""
    return ReferenceFiles(
        layout.resolve(profile.dir) / REFERENCE_FILE,
        layout.resolve(suspects.dir) / FEATURES_SAMPLE_FILE if suspects else None,
    )


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
    fetch_inputs(layout, [profile, suspects])
    pull_production(layout)
    archive, production, note = _production_reference(layout)
    comparison = Comparison(note=note)
    if production is not None:
        comparison = compare_with_production(
            production, _this_run(layout, profile, suspects), seed=seed
        )
    record = DataChecksRecord(
        checks=[check.to_json() for check in comparison.checks],
        reference=archive,
        note=comparison.note,
        policy=on_data_issue,
    )
    if record.note:
        logger.info("data checks: %s", record.note)
    if record.checks:
        ui.publish_table(
            "data-checks",
            record.checks,
            f"This run's training data against production's ({archive})",
        )
    for check in comparison.failed:
        logger.warning("data check %s failed: %s", check.name, check.detail)
        _announce(layout, check, on_data_issue)
    if comparison.failed and on_data_issue == "stop":
        names = ", ".join(check.name for check in comparison.failed)
        raise DataCheckFailed(
            f"data checks failed against production's training data ({names}; "
            f"{comparison.failed[0].detail}); --on-data-issue stop: nothing trained, production "
            "kept"
        )
    return record


def _announce(layout: Layout, check: quality.DataCheck, policy: str) -> None:
    emit_run_event(
        "catdog.data.check.failed",
        f"catdog.data.{layout.location}",
        f"catdog data checks in {layout.location}",
        {"check": check.name, **check.to_json(), "policy": policy, "artifacts": layout.location},
    )
