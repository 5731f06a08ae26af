"""The last task: summary.json, the Markdown report, the leaderboard, and the promotion gate."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from catdog.hashing import sha256_json
from catdog.io import atomic_write_json, atomic_write_text, read_json
from catdog.layout import Layout
from catdog.promotion import best_by_validation, decide
from catdog.report import leaderboard_rows, render_report
from tasks import ui

REGISTRY = "registry.json"


def _model_summary(
    layout: Layout,
    trained: dict[str, Any],
    evaluated: dict[str, Any],
    image_size: int,
    extra_seconds: float,
) -> dict[str, Any]:
    return {
        "image_size": image_size,
        "epochs": trained["epochs"],
        "history": trained["history"],
        "epoch_seconds": trained["epoch_seconds"],
        "best_epoch": trained["best_epoch"],
        "train_seconds": trained["seconds"] + extra_seconds,
        "trainable_params": trained["trainable_params"],
        "total_params": trained["total_params"],
        "path": str(layout.resolve(trained["dir"]) / "model.keras"),
        "test_accuracy": evaluated["accuracy"],
        "test_loss": evaluated["loss"],
        "confusion_matrix": evaluated["confusion_matrix"],
        "per_class": evaluated["per_class"],
        "macro_f1": evaluated["macro_f1"],
        "evaluation_dir": str(layout.resolve(evaluated["dir"])),
    }


def _production_accuracy(layout: Layout, registry: dict[str, Any], split: dict[str, Any]) -> float:
    """Production's accuracy on this run's test split, re-measured if the split changed."""
    if registry.get("split_hash") == split["split_hash"]:
        return float(registry["test_accuracy"])
    import keras

    from catdog.data.images import decode_split
    from catdog.evaluation import score
    from tasks.data import split_manifest_of

    model = keras.models.load_model(layout.production_dir / "model.keras", safe_mode=True)
    # Decoded at production's own input size, which need not be any size this run decoded.
    x_test, y_test = decode_split(split_manifest_of(layout, split), "test", model.input_shape[1])
    logits = model.predict(x_test.astype("float32"), batch_size=64, verbose=0)
    return float(score(logits, y_test, list(split["classes"]))["accuracy"])


def promote(
    layout: Layout,
    name: str,
    model: dict[str, Any],
    split: dict[str, Any],
    margin: float,
    run_id: str,
) -> dict[str, Any]:
    """Apply the gate; on promotion, replace production's model and registry atomically."""
    registry_path = layout.production_dir / REGISTRY
    registry = read_json(registry_path) if registry_path.is_file() else None
    production_accuracy = _production_accuracy(layout, registry, split) if registry else None
    decision = decide(
        model["test_accuracy"], production_accuracy, margin=margin, candidate_name=name
    )
    if decision.promote:
        layout.production_dir.mkdir(parents=True, exist_ok=True)
        staged = layout.production_dir / ".model.keras.tmp"
        shutil.copyfile(model["path"], staged)
        staged.replace(layout.production_dir / "model.keras")
        atomic_write_json(
            registry_path,
            {
                "model": name,
                "path": str(layout.production_dir / "model.keras"),
                "source": model["path"],
                "test_accuracy": model["test_accuracy"],
                "val_accuracy": model["history"]["val_accuracy"][-1],
                "split_hash": split["split_hash"],
                "classes": split["classes"],
                "image_size": model["image_size"],
                "run_id": run_id,
                "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
    return {
        "promoted": decision.promote,
        "reason": decision.reason,
        "candidate": name,
        "production_accuracy": production_accuracy,
        "margin": margin,
    }


@task(name="write_report", cache_policy=NONE, persist_result=False)
def write_report(
    run: dict[str, Any],
    manifest: dict[str, Any],
    split: dict[str, Any],
    counts: dict[str, Any],
    figures: dict[str, Any],
    arrays: dict[str, dict[str, Any]],
    features: dict[str, Any] | None,
    trained: dict[str, dict[str, Any]],
    evaluated: dict[str, dict[str, Any]],
    task_states: dict[str, str],
    artifacts_used: list[str],
    promote_margin: float,
    artifacts: str,
) -> dict[str, Any]:
    """Write this run's summary.json and report.md, and decide on promotion."""
    logger = get_run_logger()
    layout = Layout.at(artifacts)
    run_id = str(flow_run.get_id() or "local")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = layout.runs_dir / f"{stamp}-{run_id[:8]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    models: dict[str, dict[str, Any]] = {}
    for name, record in trained.items():
        # A model's time includes the stages it needs: its images' decode, and for model4*
        # the base's features. A stage that two models share counts for each of them.
        extra = arrays[name].get("seconds", 0.0)
        if features and name.startswith("model4"):
            extra += features.get("seconds", 0.0)
        models[name] = _model_summary(
            layout, record, evaluated[name], arrays[name]["image_size"], extra
        )
    baseline = counts["baseline"]
    summary: dict[str, Any] = {
        "run": {
            **run,
            "id": run_id,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "report": str(run_dir / "report.md"),
        },
        "data": {
            "classes": split["classes"],
            "layout": manifest["layout"],
            "images": manifest["images"],
            "skipped": manifest["skipped"],
            "skipped_files": split.get("skipped", []),
            "counts": counts["counts"],
            "baseline": baseline,
            "baseline_accuracy": baseline["test"],
            "majority_class": counts["majority_class"],
            "manifest_hash": manifest["manifest_hash"],
            "split_hash": split["split_hash"],
        },
        "models": models,
        "tasks": {**task_states, "write_report": "Completed"},
        "artifacts_used": sorted(set(artifacts_used)),
    }
    figure_refs: dict[str, str] = {}
    figures_dir = layout.resolve(figures["dir"])
    for kind in ("samples", "augmentation"):
        figure_refs[kind] = str(figures_dir / f"{kind}.png")
    for name, model in models.items():
        evaluation_dir = Path(model["evaluation_dir"])
        for kind, file in (
            ("curves", "curves.png"),
            ("confusion", "confusion_matrix.png"),
            ("misclassified", "misclassified.png"),
        ):
            if (evaluation_dir / file).is_file():
                figure_refs[f"{name}:{kind}"] = str(evaluation_dir / file)
    if models:
        comparison = _comparison_figure(layout, models, baseline)
        figure_refs["comparison"] = str(comparison)
        summary["artifacts_used"].append(layout.relative(comparison.parent))
        best = best_by_validation(models)
        summary["best_model"] = best
        summary["promotion"] = promote(layout, best, models[best], split, promote_margin, run_id)
        logger.info(
            "best model by validation accuracy: %s; %s", best, summary["promotion"]["reason"]
        )
    if "comparison" in figure_refs:
        summary["run"]["comparison_figure"] = figure_refs["comparison"]
    report = render_report(summary, {k: _relative_to(v, run_dir) for k, v in figure_refs.items()})
    atomic_write_text(run_dir / "report.md", report)
    atomic_write_json(run_dir / "summary.json", summary)
    atomic_write_json(layout.summary, summary)
    _publish(summary, report)
    logger.info("report: %s", run_dir / "report.md")
    return {
        "summary": str(layout.summary),
        "report": str(run_dir / "report.md"),
        "best_model": summary.get("best_model"),
    }


def _comparison_figure(
    layout: Layout, models: dict[str, dict[str, Any]], baseline: dict[str, float]
) -> Path:
    """All models' validation curves on one figure, drawn once per distinct set of histories."""
    histories = {name: model["history"] for name, model in models.items()}
    # A keyed folder of the report stage, so `cache prune` treats it like any stage output.
    folder = layout.output_dir("report", f"report-{sha256_json(histories)[:32]}")
    path = folder / "comparison.png"
    if not path.is_file():
        from catdog.plots import compare_models, save_figure

        save_figure(compare_models(histories, baseline["validation"]), path)
    return path


def _relative_to(path: str, base: Path) -> str:
    import os

    return os.path.relpath(path, base)


def _publish(summary: dict[str, Any], report: str) -> None:
    if summary["models"]:
        ui.publish_table(
            "model-leaderboard",
            leaderboard_rows(summary),
            "Models by validation accuracy, with test scores",
        )
        ui.publish_image(
            "training-curves",
            Path(summary["run"]["comparison_figure"]),
            "Validation accuracy and loss of every model",
        )
    # Figures are published as their own artifacts; relative image links would not resolve.
    text = "\n".join(line for line in report.splitlines() if not line.startswith("!["))
    ui.publish_markdown("run-report", text + "\n", "The run report")
