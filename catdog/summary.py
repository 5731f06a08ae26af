"""A run's record: summary.json and report.md, from the stages' typed records.

Everything here is plain files and JSON; the promotion decision comes in as a record of its
own (`catdog.promotion` makes it, before the report).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from catdog import catalog
from catdog.hashing import sha256_json
from catdog.io import atomic_write_json, atomic_write_text, read_json
from catdog.layout import MODEL_FILE, RECORD_FILE, REPORT_FILE, SUMMARY_FILE, Layout, size_on_disk
from catdog.stage_records import (
    ArraysRecord,
    CountsRecord,
    DataChecksRecord,
    EvaluationRecord,
    FeaturesRecord,
    FiguresRecord,
    InspectionRecord,
    ManifestRecord,
    ProfileRecord,
    PromotionRecord,
    SplitRecord,
    SuspectsRecord,
    TrainedRecord,
)
from catdog.report import render_report

EVALUATION_FIGURES = {
    "curves": "curves.png",
    "confusion": "confusion_matrix.png",
    "misclassified": "misclassified.png",
}


@dataclass(frozen=True)
class RunRecords:
    """What the pipeline's stages returned for one run, by stage and model."""

    manifest: ManifestRecord
    split: SplitRecord
    counts: CountsRecord
    figures: FiguresRecord
    arrays: dict[str, ArraysRecord]  # per model: the decoded images it trained on
    features: dict[str, FeaturesRecord]  # per model trained on cached features
    trained: dict[str, TrainedRecord]
    evaluated: dict[str, EvaluationRecord]
    inspection: InspectionRecord
    profile: ProfileRecord
    suspects: SuspectsRecord | None  # None when no model of the run has cached features
    checks: DataChecksRecord


@dataclass(frozen=True)
class RunInfo:
    """What a run was asked to do, and where its data came from (summary.json's "run")."""

    data: str
    models: list[str]  # the models trained, those they start from included
    epochs: int
    seed: int
    weights: str | None  # the weights file the frozen-base models loaded
    image_size: int
    transfer_image_size: int  # the frozen-base models' input side (if any of them runs)
    # False: the dataset URL could not be asked (or --offline); the last good download was used.
    source_fresh: bool = True
    source_warning: str | None = None

    def to_json(self, run_id: str, name: str) -> dict[str, Any]:
        facts = asdict(self)
        if not any(catalog.spec(m).input_size == "transfer_image_size" for m in self.models):
            facts["transfer_image_size"] = None
        return {**facts, "id": run_id, "name": name}


@dataclass(frozen=True)
class TaskOutcome:
    """How one task run of this run ended."""

    state: str  # "Completed", "Cached", ...
    seconds: float | None = None  # what its stage took when it computed its output
    dir: str | None = None  # its output folder, relative to the artifacts root


def features_for(name: str, records: RunRecords) -> FeaturesRecord | None:
    """The cached features model `name` trained on, or its starting model did."""
    entry = catalog.spec(name)
    while name not in records.features and entry.starts_from:
        name, entry = entry.starts_from, catalog.spec(entry.starts_from)
    return records.features.get(name)


def model_summary(layout: Layout, name: str, records: RunRecords) -> dict[str, Any]:
    """One model's entry in summary.json: its training, its test scores, where it lies."""
    trained, evaluated = records.trained[name], records.evaluated[name]
    arrays = records.arrays[name]
    # A model's time includes the stages it needs: its images' decode, and the base's features
    # for a model that trains on them (or starts from one that does). A stage that two models
    # share counts for each of them.
    features = features_for(name, records)
    extra = arrays.seconds + (features.seconds if features else 0.0)
    return {
        "image_size": arrays.image_size,
        "epochs": trained.epochs,
        "history": trained.history,
        "epoch_seconds": trained.epoch_seconds,
        "best_epoch": trained.best_epoch,
        "saved_from": trained.saved_from,  # whose weights that epoch's file holds
        "train_seconds": trained.seconds + extra,
        "trainable_params": trained.trainable_params,
        "total_params": trained.total_params,
        "path": str(layout.resolve(trained.dir) / MODEL_FILE),
        "worker": trained.worker,
        "test_accuracy": evaluated.accuracy,
        "test_loss": evaluated.loss,
        "confusion_matrix": evaluated.confusion_matrix,
        "per_class": evaluated.per_class,
        "macro_f1": evaluated.macro_f1,
        "evaluation_dir": str(layout.resolve(evaluated.dir)),
    }


def build_summary(
    layout: Layout,
    run: dict[str, Any],
    records: RunRecords,
    tasks: dict[str, TaskOutcome],
    promotion: PromotionRecord | None,
) -> dict[str, Any]:
    """summary.json's content, but the report's paths."""
    manifest, split, counts = records.manifest, records.split, records.counts
    used = [outcome.dir for outcome in tasks.values() if outcome.dir]
    models = {name: model_summary(layout, name, records) for name in records.trained}
    return {
        "run": {**run, "finished_at": datetime.now(UTC).isoformat(timespec="seconds")},
        "data": {
            "classes": split.classes,
            "layout": manifest.layout,
            "images": manifest.images,
            "skipped": manifest.skipped,
            "skipped_files": split.skipped,
            "counts": counts.counts,
            "baseline": counts.baseline,
            "baseline_accuracy": counts.baseline["test"],
            "majority_class": counts.majority_class,
            "manifest_hash": manifest.manifest_hash,
            "split_hash": split.split_hash,
            "source_fresh": run["source_fresh"],
            "source_warning": run["source_warning"],
        },
        "data_checks": records.checks.checks,
        "data_checks_reference": records.checks.reference,
        "data_checks_note": records.checks.note,
        "on_data_issue": records.checks.policy,
        "near_duplicates": records.profile.near_duplicates,
        "near_duplicate_groups": records.profile.groups,
        "suspect_labels": records.suspects.suspects if records.suspects else [],
        "suspects_from": records.suspects.features if records.suspects else None,
        "models": models,
        "best_model": promotion.candidate if promotion else None,
        "promotion": asdict(promotion) if promotion else None,
        "tasks": {label: outcome.state for label, outcome in tasks.items()},
        "artifacts_used": sorted(set(used)),
        "disk_bytes": disk_bytes(layout, used),
        "stage_seconds": {
            label: outcome.seconds for label, outcome in tasks.items() if outcome.seconds
        },
    }


def disk_bytes(layout: Layout, folders: list[str]) -> dict[str, int]:
    """Bytes on disk of the run's stage outputs, by stage (from each folder's record), and in
    all; `python -m catdog cache prune` frees them once no recent run uses them."""
    by_stage: dict[str, int] = {}
    for folder in sorted(set(folders)):
        path = layout.resolve(folder)
        try:
            stage = read_json(path / RECORD_FILE).get("stage", "other")
        except (OSError, ValueError):
            stage = "other"
        by_stage[stage] = by_stage.get(stage, 0) + size_on_disk(path)
    return {**by_stage, "total": sum(by_stage.values())}


def figure_paths(layout: Layout, records: RunRecords, summary: dict[str, Any]) -> dict[str, Path]:
    """Every figure of the run that exists, by report reference ("samples", "model1:curves")."""
    figures_dir = layout.resolve(records.figures.dir)
    paths = {kind: figures_dir / f"{kind}.png" for kind in ("samples", "augmentation")}
    profile_dir = layout.resolve(records.profile.dir)
    for kind in ("profile", "near_duplicates"):
        paths[kind] = profile_dir / f"{kind}.png"
    if records.suspects:
        paths["suspects"] = layout.resolve(records.suspects.dir) / "suspects.png"
    paths = {kind: path for kind, path in paths.items() if path.is_file()}
    for name, model in summary["models"].items():
        for kind, file_name in EVALUATION_FIGURES.items():
            path = Path(model["evaluation_dir"]) / file_name
            if path.is_file():
                paths[f"{name}:{kind}"] = path
    return paths


def comparison_figure(layout: Layout, summary: dict[str, Any]) -> Path:
    """All models' validation curves on one figure, drawn once per distinct set of histories."""
    histories = {name: model["history"] for name, model in summary["models"].items()}
    # A keyed folder of the report stage, so `cache prune` treats it like any stage output.
    folder = layout.output_dir("report", f"report-{sha256_json(histories)[:32]}")
    path = folder / "comparison.png"
    if not path.is_file():
        from catdog.plots import compare_models, save_figure

        save_figure(compare_models(histories, summary["data"]["baseline"]["validation"]), path)
    return path


def write_run(
    layout: Layout,
    run: dict[str, Any],
    records: RunRecords,
    *,
    tasks: dict[str, TaskOutcome],
    promotion: PromotionRecord | None,
) -> tuple[dict[str, Any], str]:
    """Write the run's summary.json and report.md (in its own run folder, and summary.json at
    the root).

    Args:
        layout: The artifacts folder.
        run: The run's parameters and identity; "id" names the run folder.
        records: The stages' records.
        tasks: How every task run of the run ended, by task run name.
        promotion: The promotion gate's decision on the run's best model.

    Returns:
        (summary, report Markdown).
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    # The id's end: Prefect's ids (UUIDv7) begin with the time, so two runs of one second
    # would share their first characters.
    run_dir = layout.runs_dir / f"{stamp}-{str(run['id'])[-12:]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = build_summary(layout, run, records, tasks, promotion)
    summary["run"]["report"] = str(run_dir / REPORT_FILE)
    figures = figure_paths(layout, records, summary)
    if summary["models"]:
        comparison = comparison_figure(layout, summary)
        figures["comparison"] = comparison
        summary["run"]["comparison_figure"] = str(comparison)
        summary["artifacts_used"].append(layout.relative(comparison.parent))
    report = render_report(summary, {k: os.path.relpath(v, run_dir) for k, v in figures.items()})
    atomic_write_text(run_dir / REPORT_FILE, report)
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
    atomic_write_json(layout.summary, summary)
    return summary, report
