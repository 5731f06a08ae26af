"""The last task: summary.json and the Markdown report, on disk and in the UI."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger
from prefect.runtime import flow_run

from catdog.layout import Layout
from catdog.mirror import address, fetch_inputs, push_files
from catdog.report import leaderboard_rows
from catdog.stage_records import PromotionRecord, ReportRecord
from catdog.stages import stage
from catdog.summary import RunInfo, RunRecords, RunSummary, TaskOutcome, write_run
from tasks import ui
from tasks.caching import stage_task


@stage_task("report")
def write_report(
    run: RunInfo,
    records: RunRecords,
    promotion: PromotionRecord,
    tasks: dict[str, TaskOutcome],
    keep_runs: int,
    artifacts: str,
) -> ReportRecord:
    """Write this run's summary.json and report.md, show them in the UI, and remove what the
    last `keep_runs` runs no longer use."""
    layout = Layout.at(artifacts)
    fetch_inputs(layout, [records, promotion])
    summary, report = write_run(
        layout,
        run,
        records,
        run_id=str(flow_run.get_id() or "local"),
        run_name=str(flow_run.get_name() or "local"),
        tasks={**tasks, stage("report").task: TaskOutcome("Completed")},
        promotion=promotion,
    )
    push_files(
        layout,
        [
            layout.resolve(path).parent
            for path in (summary.run.report, summary.run.comparison_figure)
            if path
        ]
        + [layout.summary],
    )
    try:
        _publish(summary, promotion, report)
    except Exception as error:  # the files are written: the UI's copies must not fail the run
        get_run_logger().warning("the report's artifacts did not reach the UI (%s)", error)
    report_file = Path(summary.run.report)
    get_run_logger().info("report: %s", address(layout, report_file))
    if keep_runs:
        _prune(layout, keep_runs)
    return ReportRecord(
        summary=address(layout, layout.summary),
        report=address(layout, report_file),
        best_model=summary.best_model,
    )


def _publish(summary: RunSummary, promotion: PromotionRecord, report: str) -> None:
    if summary.run.comparison_figure:  # drawn when the run trained models
        ui.publish_table(
            "model-leaderboard",
            leaderboard_rows(summary),
            "Models by the validation accuracy of their saved epoch, with test scores. "
            f"Promotion: {promotion.reason}",
        )
        ui.publish_image(
            "training-curves",
            Path(summary.run.comparison_figure),
            "Validation accuracy and loss of every model",
        )
    # Figures are published as their own artifacts; relative image links would not resolve.
    text = "\n".join(line for line in report.splitlines() if not line.startswith("!["))
    ui.publish_markdown("run-report", text + "\n", "The run report")


def _prune(layout: Layout, keep: int) -> None:
    """`cache prune --keep N`, unless another run on the folder is in progress (what it uses
    is on no finished run's list yet). With a store, this machine's copy only: runs on other
    hosts may still reuse what the store holds. The run's work is done: a failure here is a
    warning."""
    from catdog.io import human_bytes
    from catdog.prune import prune

    logger = get_run_logger()
    try:
        this_run = str(flow_run.get_id() or "local")
        report = prune(layout.location, keep=keep, this_run=this_run, in_store=False)
    except Exception as error:  # the next run, or `cache prune`, tries again
        logger.warning("not pruning %s: %s", layout.location, error)
        return
    if report.busy:
        logger.info(
            "not pruning: run(s) %s in progress on %s", ", ".join(report.busy), layout.location
        )
        return
    logger.info(
        "kept what the last %d run(s) used; removed %d item(s), %s",
        len(report.kept_runs),
        len(report.removals),
        human_bytes(report.freed_bytes),
    )
