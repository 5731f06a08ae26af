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
from catdog.hashing import sha256_json
from catdog.io import atomic_write_json, atomic_write_text
from catdog.layout import MODEL_FILE, REPORT_FILE, SUMMARY_FILE, Layout
from catdog.promotion import TestImages, best_by_validation, promote
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
        "train_seconds": trained["seconds"] + extra,
        "trainable_params": trained["trainable_params"],
        "total_params": trained["total_params"],
        "path": str(layout.resolve(trained["dir"]) / MODEL_FILE),
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
        },
        "models": {name: model_summary(layout, name, records) for name in records.trained},
        "tasks": task_states,
        "artifacts_used": sorted(set(artifacts_used)),
    }


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


def write_run(
    layout: Layout,
    run: dict[str, Any],
    records: StageRecords,
    *,
    task_states: dict[str, str],
    artifacts_used: list[str],
    promote_margin: float,
    test_images: TestImages,
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
        test_images: The test split's images at a given input side, to re-measure production
            on this run's split.

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
        summary["promotion"] = promote(
            layout,
            best,
            summary["models"][best],
            records.split,
            promote_margin,
            str(run["id"]),
            test_images,
        )
        logger.info(
            "best model by validation accuracy: %s; %s", best, summary["promotion"]["reason"]
        )
    report = render_report(summary, {k: os.path.relpath(v, run_dir) for k, v in figures.items()})
    atomic_write_text(run_dir / REPORT_FILE, report)
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
    atomic_write_json(layout.summary, summary)
    return summary, report
