"""The last task: summary.json and the Markdown report, on disk and in the UI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run

from catdog.layout import Layout
from catdog.records import PromotionRecord, ReportRecord
from catdog.report import leaderboard_rows
from catdog.stages import stage
from catdog.summary import RunInfo, RunRecords, TaskOutcome, write_run
from tasks import ui
from tasks.caching import stage_task


@stage_task("report")
def write_report(
    run: RunInfo,
    records: RunRecords,
    promotion: PromotionRecord,
    tasks: dict[str, TaskOutcome],
    artifacts: str,
) -> ReportRecord:
    """Write this run's summary.json and report.md, and show them in the UI."""
    layout = Layout.at(artifacts)
    summary, report = write_run(
        layout,
        run.to_json(str(flow_run.get_id() or "local"), str(flow_run.get_name() or "local")),
        records,
        tasks={**tasks, stage("report").task: TaskOutcome("Completed")},
        promotion=promotion,
    )
    try:
        _publish(summary, report)
    except Exception as error:  # the files are written: the UI's copies must not fail the run
        get_run_logger().warning("the report's artifacts did not reach the UI (%s)", error)
    get_run_logger().info("report: %s", summary["run"]["report"])
    return ReportRecord(
        summary=str(layout.summary),
        report=summary["run"]["report"],
        best_model=summary["best_model"],
    )


def _publish(summary: dict[str, Any], report: str) -> None:
    if summary["models"]:
        ui.publish_table(
            "model-leaderboard",
            leaderboard_rows(summary),
            "Models by the validation accuracy of their saved epoch, with test scores. "
            f"Promotion: {summary['promotion']['reason']}",
        )
        ui.publish_image(
            "training-curves",
            Path(summary["run"]["comparison_figure"]),
            "Validation accuracy and loss of every model",
        )
    # Figures are published as their own artifacts; relative image links would not resolve.
    text = "\n".join(line for line in report.splitlines() if not line.startswith("!["))
    ui.publish_markdown("run-report", text + "\n", "The run report")
