"""The last task: summary.json, the Markdown report, the leaderboard, and the promotion gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from catdog.hashing import code_fingerprint
from catdog.layout import Layout
from catdog.report import leaderboard_rows
from catdog.summary import StageRecords, write_run
from tasks import ui
from tasks.data import split_manifest_of
from tasks.training import TRAIN_CODE


@task(name="write_report", cache_policy=NONE, persist_result=False)
def write_report(
    run: dict[str, Any],
    records: StageRecords,
    task_states: dict[str, str],
    artifacts_used: list[str],
    promote_margin: float,
    artifacts: str,
) -> dict[str, Any]:
    """Write this run's summary.json and report.md, and decide on promotion."""
    layout = Layout.at(artifacts)
    summary, report = write_run(
        layout,
        {**run, "id": str(flow_run.get_id() or "local"), "code": code_fingerprint(*TRAIN_CODE)},
        records,
        task_states={**task_states, "write_report": "Completed"},
        artifacts_used=artifacts_used,
        promote_margin=promote_margin,
        split=split_manifest_of(layout, records.split),
    )
    _publish(summary, report)
    get_run_logger().info("report: %s", summary["run"]["report"])
    return {
        "summary": str(layout.summary),
        "report": summary["run"]["report"],
        "best_model": summary.get("best_model"),
    }


def _publish(summary: dict[str, Any], report: str) -> None:
    if summary["models"]:
        promotion = summary["promotion"]
        ui.publish_table(
            "model-leaderboard",
            leaderboard_rows(summary),
            "Models by the validation accuracy of their saved epoch, with test scores. "
            f"Promotion: {promotion['reason']}",
        )
        ui.publish_image(
            "training-curves",
            Path(summary["run"]["comparison_figure"]),
            "Validation accuracy and loss of every model",
        )
    # Figures are published as their own artifacts; relative image links would not resolve.
    text = "\n".join(line for line in report.splitlines() if not line.startswith("!["))
    ui.publish_markdown("run-report", text + "\n", "The run report")
