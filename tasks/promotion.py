"""The promotion gate as its own task: the run's best model against production."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from prefect import get_run_logger
from prefect.runtime import flow_run

from catdog.candidates import Candidate, SplitFacts, best_candidate, split_facts
from catdog.data.images import split_files
from catdog.data.reference import FEATURES_SAMPLE_FILE, REFERENCE_FILE
from catdog.export import ExportCheck
from catdog.gate import Ship, promote, propose
from catdog.hashing import code_fingerprint
from catdog.layout import PROBABILITIES_FILE, Layout
from catdog.mirror import fetch_inputs
from catdog.stage_records import Approval, Policy, PromotionRecord
from catdog.stages import TRAIN_CODE
from catdog.summary import RunRecords
from tasks.caching import stage_task
from tasks.data import fetch_images, split_manifest_of
from tasks.events import emit_run_event


def _candidate(layout: Layout, records: RunRecords) -> Candidate:
    return best_candidate(
        layout, records.trained, records.evaluated, records.arrays, code_fingerprint(*TRAIN_CODE)
    )


def _split(layout: Layout, records: RunRecords) -> SplitFacts:
    manifest = split_manifest_of(layout, records.split)
    # Production's model may take another input size: it reads the test images themselves.
    fetch_images(layout, records.split, manifest.in_split("test"))
    return split_facts(manifest, records.split, records.manifest)


def _hold(records: RunRecords) -> str | None:
    """Why failed data checks hold production back, under --on-data-issue hold."""
    failed = records.checks.failed
    if records.checks.policy != "hold" or not failed:
        return None
    return f"data checks failed ({', '.join(str(check['name']) for check in failed)})"


def _reference(layout: Layout, records: RunRecords) -> dict[str, Path]:
    """What describes the candidate's training data, kept with it if it is promoted."""
    files = {REFERENCE_FILE: layout.resolve(records.profile.dir) / REFERENCE_FILE}
    if records.suspects:
        files[FEATURES_SAMPLE_FILE] = layout.resolve(records.suspects.dir) / FEATURES_SAMPLE_FILE
    return files


def _shipper(layout: Layout, records: RunRecords, split: SplitFacts) -> Ship:
    """Exports a candidate into a folder and checks them on the test split (catdog.export)."""

    def ship(candidate: Candidate, folder: Path) -> ExportCheck:
        from catdog.export import export_checked

        return export_checked(
            Path(candidate.path),  # loaded there, and let go before the probe process starts
            folder,
            list(records.split.classes),
            images=split_files(layout.resolve(records.arrays[candidate.name].dir), "test")[0],
            trained=np.load(
                layout.resolve(records.evaluated[candidate.name].dir) / PROBABILITIES_FILE
            ),
            labels=split.test_labels,
        )

    return ship


@stage_task("propose")
def propose_promotion(records: RunRecords, policy: Policy, artifacts: str) -> PromotionRecord:
    """What the gate would decide for the run's best model: to ask a person before it acts."""
    layout = Layout.at(artifacts)
    fetch_inputs(layout, [records])
    return propose(
        layout, _candidate(layout, records), _split(layout, records), policy, _hold(records)
    )


@stage_task("promote")
def promote_model(
    records: RunRecords,
    policy: Policy,
    export: bool,
    approval: Approval | None,
    artifacts: str,
) -> PromotionRecord:
    """Score the run's best model against production on the same test images; promote it only
    if it meets the policy, its exports pass their check and, when a person was asked, they
    approved."""
    started = time.perf_counter()
    layout = Layout.at(artifacts)
    fetch_inputs(layout, [records])
    candidate = _candidate(layout, records)
    split = _split(layout, records)
    decision = promote(
        layout,
        candidate,
        split,
        policy,
        {"id": str(flow_run.get_id() or "local"), "name": flow_run.get_name()},
        ship=_shipper(layout, records, split) if export else None,
        approval=approval,
        hold=_hold(records),
        reference=_reference(layout, records),
    )
    decision = replace(decision, seconds=time.perf_counter() - started)
    logger = get_run_logger()
    logger.info(
        "best model by the validation accuracy of its saved epoch: %s (epoch %d); %s",
        candidate.name,
        candidate.epoch,
        decision.reason,
    )
    if decision.export_check:
        logger.info("exports checked in fresh processes: %s", decision.export_check.reason())
    announce(layout, decision)
    return decision


def announce(layout: Layout, decision: PromotionRecord) -> None:
    """Emit `catdog.model.promoted` or `catdog.model.kept` for automations and alerts: the
    production of this artifacts folder, the run, the candidate, the accuracies, the rule
    that decided and the gate's evidence."""
    emit_run_event(
        f"catdog.model.{'promoted' if decision.promoted else 'kept'}",
        f"catdog.production.{layout.location}",
        f"catdog production in {layout.location}",
        {**decision.to_json(), "artifacts": layout.location},
    )
