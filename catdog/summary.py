"""A run's record: summary.json, report.md and the promotion decision, from the stage records.

The stage records are the small dicts the pipeline's stages return (a folder relative to the
artifacts root, its cache key, and a few facts). Everything here is plain files and JSON.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from catdog import catalog
from catdog.data.records import Manifest
from catdog.hashing import sha256_json
from catdog.io import atomic_write_json, atomic_write_text, read_json
from catdog.layout import (
    MODEL_FILE,
    RECORD_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    Layout,
    size_on_disk,
)
from catdog.promotion import (
    Candidate,
    SplitFacts,
    best_by_validation,
    promote,
    shipped_val_accuracy,
)
from catdog.report import render_report

logger = logging.getLogger(__name__)

Record = dict[str, Any]
EVALUATION_FIGURES = {
    "curves": "curves.png",
    "confusion": "confusion_matrix.png",
    "misclassified": "misclassified.png",
}


@dataclass(frozen=True)
class StageRecords:
    """What the pipeline's stages returned for one run."""

    manifest: Record
    split: Record
    counts: Record
    figures: Record
    arrays: dict[str, Record]  # per model: the decoded images it trained on
    features: Record | None
    trained: dict[str, Record]
    evaluated: dict[str, Record]


def model_summary(layout: Layout, name: str, records: StageRecords) -> dict[str, Any]:
    """One model's entry in summary.json: its training, its test scores, where it lies."""
    trained, evaluated, arrays = (
        records.trained[name],
        records.evaluated[name],
        records.arrays[name],
    )
    # A model's time includes the stages it needs: its images' decode, and the base's features
    # for a model that trains on them (or starts from one that does). A stage that two models
    # share counts for each of them.
    extra = arrays.get("seconds", 0.0)
    if records.features and _uses_features(name):
        extra += records.features.get("seconds", 0.0)
    return {
        "image_size": arrays["image_size"],
        "epochs": trained["epochs"],
        "history": trained["history"],
        "epoch_seconds": trained["epoch_seconds"],
        "best_epoch": trained["best_epoch"],
        "saved_from": trained.get("saved_from", name),  # whose weights that epoch's file holds
        "train_seconds": trained["seconds"] + extra,
        "trainable_params": trained["trainable_params"],
        "total_params": trained["total_params"],
        "path": str(layout.resolve(trained["dir"]) / MODEL_FILE),
        "worker": trained.get("worker"),
        "test_accuracy": evaluated["accuracy"],
        "test_loss": evaluated["loss"],
        "confusion_matrix": evaluated["confusion_matrix"],
        "per_class": evaluated["per_class"],
        "macro_f1": evaluated["macro_f1"],
        "evaluation_dir": str(layout.resolve(evaluated["dir"])),
    }


def _uses_features(name: str) -> bool:
    entry = catalog.spec(name)
    while entry.starts_from and not entry.trains_on_features:
        entry = catalog.spec(entry.starts_from)
    return entry.trains_on_features


def build_summary(
    layout: Layout,
    run: dict[str, Any],
    records: StageRecords,
    task_states: dict[str, str],
    artifacts_used: list[str],
) -> dict[str, Any]:
    """summary.json's content, before the promotion decision and the report's path."""
    manifest, split, counts = records.manifest, records.split, records.counts
    return {
        "run": {**run, "finished_at": datetime.now(UTC).isoformat(timespec="seconds")},
        "data": {
            "classes": split["classes"],
            "layout": manifest["layout"],
            "images": manifest["images"],
            "skipped": manifest["skipped"],
            "skipped_files": split.get("skipped", []),
            "counts": counts["counts"],
            "baseline": counts["baseline"],
            "baseline_accuracy": counts["baseline"]["test"],
            "majority_class": counts["majority_class"],
            "manifest_hash": manifest["manifest_hash"],
            "split_hash": split["split_hash"],
            # False: the dataset URL could not be asked (or --offline), last good download used.
            "source_fresh": run.get("source_fresh", True),
            "source_warning": run.get("source_warning"),
        },
        "models": {name: model_summary(layout, name, records) for name in records.trained},
        "tasks": task_states,
        "artifacts_used": sorted(set(artifacts_used)),
        "disk_bytes": disk_bytes(layout, artifacts_used),
        "stage_seconds": stage_seconds(records),
    }


def stage_seconds(records: StageRecords) -> dict[str, float]:
    """Seconds each decode, feature and training stage took when it computed its output (a
    cached stage reports the run that computed it)."""
    seconds = {
        f"decode_images[{arrays['image_size']}]": arrays.get("seconds", 0.0)
        for arrays in records.arrays.values()
    }
    if records.features:
        seconds["extract_features"] = records.features.get("seconds", 0.0)
    for name, trained in records.trained.items():
        seconds[f"train_model[{name}]"] = trained["seconds"]
    return seconds


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


def figure_paths(layout: Layout, records: StageRecords, summary: dict[str, Any]) -> dict[str, Path]:
    """Every figure of the run that exists, by report reference ("samples", "model1:curves")."""
    figures_dir = layout.resolve(records.figures["dir"])
    paths = {kind: figures_dir / f"{kind}.png" for kind in ("samples", "augmentation")}
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


def split_facts(split: Manifest, records: StageRecords) -> SplitFacts:
    """What the promotion gate needs to know of this run's split."""
    from catdog.data.images import DecodedOnDemand

    test = split.in_split("test")
    return SplitFacts(
        split_hash=records.split["split_hash"],
        data_hash=records.manifest["manifest_hash"],
        classes=list(split.classes),
        test_labels=[entry.label for entry in test],
        test_hashes=[entry.sha256 for entry in test],
        seen_hashes=[
            entry.sha256 for entry in split.images if entry.split in ("train", "validation")
        ],
        test_images=lambda side: DecodedOnDemand(split.paths(test), side),
    )


def write_run(
    layout: Layout,
    run: dict[str, Any],
    records: StageRecords,
    *,
    task_states: dict[str, str],
    artifacts_used: list[str],
    promote_margin: float,
    split: Manifest,
) -> tuple[dict[str, Any], str]:
    """Write the run's summary.json and report.md (in its own run folder, and summary.json at
    the root), and apply the promotion gate to the best model.

    Args:
        layout: The artifacts folder.
        run: The run's parameters and identity; "id" names the run folder.
        records: The stages' records.
        task_states: Final state name of every task, by task run name.
        artifacts_used: Stage folders (relative) the run read or wrote.
        promote_margin: Accuracy the best model must gain over production to replace it.
        split: The run's split manifest (the gate needs the test images and what the models
            trained on).

    Returns:
        (summary, report Markdown).
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = layout.runs_dir / f"{stamp}-{str(run['id'])[:8]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = build_summary(layout, run, records, task_states, artifacts_used)
    summary["run"]["report"] = str(run_dir / REPORT_FILE)
    figures = figure_paths(layout, records, summary)
    if summary["models"]:
        comparison = comparison_figure(layout, summary)
        figures["comparison"] = comparison
        summary["run"]["comparison_figure"] = str(comparison)
        summary["artifacts_used"].append(layout.relative(comparison.parent))
        best = best_by_validation(summary["models"])
        summary["best_model"] = best
        model = summary["models"][best]
        candidate = Candidate(
            name=best,
            path=model["path"],
            epoch=model["best_epoch"],
            val_accuracy=shipped_val_accuracy(model),
            test_accuracy=model["test_accuracy"],
            predictions=records.evaluated[best]["predictions"],
            image_size=model["image_size"],
            code=str(run.get("code", "")),
        )
        summary["promotion"] = promote(
            layout, candidate, split_facts(split, records), promote_margin, summary["run"]
        )
        logger.info(
            "best model by the validation accuracy of its saved epoch: %s (epoch %d); %s",
            best,
            candidate.epoch,
            summary["promotion"]["reason"],
        )
    report = render_report(summary, {k: os.path.relpath(v, run_dir) for k, v in figures.items()})
    atomic_write_text(run_dir / REPORT_FILE, report)
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
    atomic_write_json(layout.summary, summary)
    return summary, report
