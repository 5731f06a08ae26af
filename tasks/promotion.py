"""The promotion gate as its own task: the run's best model against production."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import get_run_logger
from prefect.runtime import flow_run

from catdog.export import ExportCheck
from catdog.hashing import code_fingerprint
from catdog.layout import PROBABILITIES_FILE, Layout
from catdog.promotion import Candidate, best_candidate, promote, split_facts
from catdog.records import PromotionRecord
from catdog.stages import TRAIN_CODE
from catdog.summary import RunRecords
from tasks.caching import stage_task
from tasks.data import split_manifest_of


@stage_task("promote")
def promote_model(
    records: RunRecords, margin: float, export: bool, artifacts: str
) -> PromotionRecord:
    """Score the run's best model against production on the same test images; promote it only
    if it is better by more than the margin."""
    layout = Layout.at(artifacts)
    candidate = best_candidate(
        layout, records.trained, records.evaluated, records.arrays, code_fingerprint(*TRAIN_CODE)
    )

    def ship(candidate: Candidate, folder: Path) -> ExportCheck:
        """Export the candidate and check each export in a fresh process on the test split."""
        from catdog.evaluation import load_model
        from catdog.export import check_export, export_model

        export_model(load_model(candidate.path), folder, list(records.split.classes))
        test_images = layout.resolve(records.arrays[candidate.name].dir) / "test_x.npy"
        keras_said = layout.resolve(records.evaluated[candidate.name].dir) / PROBABILITIES_FILE
        return check_export(folder, test_images, np.load(keras_said))

    decision = promote(
        layout,
        candidate,
        split_facts(split_manifest_of(layout, records.split), records.split, records.manifest),
        margin,
        {"id": str(flow_run.get_id() or "local"), "name": flow_run.get_name()},
        ship=ship if export else None,
    )
    logger = get_run_logger()
    logger.info(
        "best model by the validation accuracy of its saved epoch: %s (epoch %d); %s",
        candidate.name,
        candidate.epoch,
        decision.reason,
    )
    if decision.export_check:
        logger.info("exports checked in fresh processes: %s", decision.export_check["reason"])
    return decision
