"""The last task: summary.json and the Markdown report, on disk and in the UI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from catdog.layout import Layout
from catdog.records import PromotionRecord, ReportRecord
from catdog.report import leaderboard_rows
from catdog.summary import RunRecords, TaskOutcome, write_run
from tasks import ui


@task(name="write_report", cache_policy=NONE, persist_result=False)
def write_report(
    run: dict[str, Any],
    records: RunRecords,
    promotion: PromotionRecord,
    tasks: dict[str, TaskOutcome],
    artifacts: str,
) -> ReportRecord:
    """Write this run's summary.json and report.md, and show them in the UI."""
    layout = Layout.at(artifacts)
    summary, report = write_run(
        layout,
        {**run, "id": str(flow_run.get_id() or "local")},
        records,
        tasks={**tasks, "write_report": TaskOutcome("Completed")},
        promotion=promotion,
    )
    _publish(summary, report)
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
