"""The promotion gate as its own task: the run's best model against production."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.runtime import flow_run

from catdog.hashing import code_fingerprint
from catdog.layout import Layout
from catdog.promotion import best_candidate, promote, split_facts
from catdog.records import PromotionRecord
from catdog.stages import TRAIN_CODE
from catdog.summary import RunRecords
from tasks.caching import stage_task
from tasks.data import split_manifest_of


@stage_task("promote")
def promote_model(records: RunRecords, margin: float, artifacts: str) -> PromotionRecord:
    """Score the run's best model against production on the same test images; promote it only
    if it is better by more than the margin."""
    layout = Layout.at(artifacts)
    candidate = best_candidate(
        layout, records.trained, records.evaluated, records.arrays, code_fingerprint(*TRAIN_CODE)
    )
    decision = promote(
        layout,
        candidate,
        split_facts(split_manifest_of(layout, records.split), records.split, records.manifest),
        margin,
        {"id": str(flow_run.get_id() or "local"), "name": flow_run.get_name()},
    )
    get_run_logger().info(
        "best model by the validation accuracy of its saved epoch: %s (epoch %d); %s",
        candidate.name,
        candidate.epoch,
        decision.reason,
    )
    return decision
