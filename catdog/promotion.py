"""The promotion gate: the run's best model against production (see `catdog.registry`).

A new best model replaces production only when, scored with production on the same current
test split, it meets the policy: better by more than a margin and, where set, above an accuracy
floor, above a recall floor on every class and significant under an exact McNemar test; the
decision names the rule that decided and states both accuracies and the images on which the two
disagree. A person's approval, when asked for, and exports that pass their check come on top
(see `promote`). Runs take turns at the gate
(an OS file lock), and every decision is appended to the registry's history, so production can
be rolled back to the model it replaced.
"""

from __future__ import annotations

import math
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from catdog import registry
from catdog.arrays import Rows
from catdog.data.records import Manifest
from catdog.export import ExportCheck, RuntimeCheck
from catdog.io import atomic_write_json, exclusive_lock, read_json, replace_directory
from catdog.layout import MODEL_FILE, Layout
from catdog.stage_records import (
    ArraysRecord,
    EvaluationRecord,
    ManifestRecord,
    PromotionRecord,
    SplitRecord,
    TrainedRecord,
)
from catdog.registry import Production

SEEN_FILE = "seen.json"  # beside an archived model: the images it trained or was selected on


@dataclass(frozen=True)
class Policy:
    """What a candidate must meet to replace production (None: that rule is off)."""

    margin: float = 0.0  # test-accuracy gain over production, on the same test images
    min_accuracy: float | None = None  # the candidate's own test accuracy, at least
    min_class_recall: float | None = None  # every class's test recall, at least
    # McNemar p against production, at most: the gain must be more than chance on these images
    max_p_value: float | None = None


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    # Which rule decided: "first", "margin", "min_accuracy", "min_class_recall",
    # "max_p_value", "not_comparable" (production saw test images), "exports" or "approval".
    rule: str = "margin"


@dataclass(frozen=True)
class Evidence:
    """Candidate against production on the same test images."""

    candidate_accuracy: float
    production_accuracy: float
    disagreements: int  # images that exactly one of the two classifies correctly
    candidate_only: int  # right by the candidate only
    production_only: int  # right by production only
    p_value: float  # exact two-sided McNemar test on the disagreements


@dataclass(frozen=True)
class Candidate:
    """The run's best model, as the gate needs it."""

    name: str
    path: str  # its model.keras
    epoch: int  # the epoch whose weights the file holds
    val_accuracy: float  # validation accuracy of that epoch
    test_accuracy: float
    predictions: Sequence[int]  # class per test image, in split order
    image_size: int
    code: str  # fingerprint of the code that trained it
    class_recall: dict[str, float] = field(default_factory=dict)  # on the test split


@dataclass(frozen=True)
class SplitFacts:
    """This run's test split, and what its models trained on."""

    split_hash: str
    data_hash: str
    classes: Sequence[str]
    test_labels: Sequence[int]
    test_hashes: Sequence[str]  # content hash per test image
    seen_hashes: Sequence[str]  # content hashes of the training and validation images
    test_images: Callable[[int], Rows]  # the test images, decoded at a given side when read


def mcnemar_exact(candidate_only: int, production_only: int) -> float:
    """Two-sided exact McNemar p-value: under "equally good", each disagreement is a fair coin.

    Args:
        candidate_only: Images the candidate classifies correctly and production does not.
        production_only: Images production classifies correctly and the candidate does not.

    Returns:
        The probability of a split of the disagreements at least this lopsided; 1.0 when
        there are none.
    """
    n = candidate_only + production_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(candidate_only, production_only) + 1))
    return min(1.0, 2 * tail / 2**n)


def compare(candidate: Sequence[int], production: Sequence[int], labels: Sequence[int]) -> Evidence:
    """Score two models' predictions on the same labelled images against each other."""
    if not len(candidate) == len(production) == len(labels) > 0:
        raise ValueError("candidate, production and labels must cover the same test images")
    truth = np.asarray(labels)
    right_c = np.asarray(candidate) == truth
    right_p = np.asarray(production) == truth
    only_c = int(np.sum(right_c & ~right_p))
    only_p = int(np.sum(right_p & ~right_c))
    return Evidence(
        candidate_accuracy=float(right_c.mean()),
        production_accuracy=float(right_p.mean()),
        disagreements=only_c + only_p,
        candidate_only=only_c,
        production_only=only_p,
        p_value=mcnemar_exact(only_c, only_p),
    )


def decide(
    candidate_accuracy: float,
    production_accuracy: float | None,
    *,
    margin: float,
    candidate_name: str,
) -> Decision:
    """Promote `candidate_name` if no production model exists, or if it beats production's
    accuracy on the same test split by more than `margin` (absolute accuracy points)."""
    if production_accuracy is None:
        return Decision(True, f"{candidate_name} is the first production model", "first")
    gain = candidate_accuracy - production_accuracy
    # Rounded: 0.8 - 0.7 is 0.10000000000000009 in floats, which must not beat a 0.1 margin.
    if round(gain, 9) > round(margin, 9):
        return Decision(
            True,
            f"{candidate_name} scores {candidate_accuracy:.4f} on the test split, "
            f"{gain:+.4f} over production's {production_accuracy:.4f} (margin {margin:.4f})",
        )
    return Decision(
        False,
        f"kept production ({production_accuracy:.4f} on the test split): {candidate_name} "
        f"scores {candidate_accuracy:.4f}, {gain:+.4f}, not above the margin {margin:.4f}",
    )


def below_a_floor(candidate: Candidate, policy: Policy) -> Decision | None:
    """A decision to keep production if the candidate misses an absolute floor of `policy`
    (its test accuracy, or one class's recall), whatever production scores; else None."""
    if policy.min_accuracy is not None and candidate.test_accuracy < policy.min_accuracy:
        return Decision(
            False,
            f"kept production: {candidate.name} scores {candidate.test_accuracy:.4f} on the "
            f"test split, under the floor of {policy.min_accuracy:.4f} (--min-accuracy)",
            "min_accuracy",
        )
    if policy.min_class_recall is not None:
        low = {c: r for c, r in candidate.class_recall.items() if r < policy.min_class_recall}
        if low:
            listed = ", ".join(f"{c} {r:.4f}" for c, r in low.items())
            return Decision(
                False,
                f"kept production: {candidate.name}'s recall on the test split is under the "
                f"floor of {policy.min_class_recall:.4f} for {listed} (--min-class-recall)",
                "min_class_recall",
            )
    return None


def shipped_val_accuracy(model: dict[str, Any]) -> float:
    """Validation accuracy of the epoch whose weights a model's file holds (its best epoch),
    from its summary entry (or anything with its "history" and "best_epoch")."""
    history = model["history"]["val_accuracy"]
    return float(history[model["best_epoch"] - 1]) if model.get("best_epoch") else history[-1]


def best_by_validation(models: dict[str, dict[str, Any]]) -> str:
    """The model whose shipped checkpoint has the highest validation accuracy (the first of
    equals); test accuracy is never consulted."""
    return max(models, key=lambda name: shipped_val_accuracy(models[name]))


def best_candidate(
    layout: Layout,
    trained: dict[str, TrainedRecord],
    evaluated: dict[str, EvaluationRecord],
    arrays: dict[str, ArraysRecord],
    code: str,
) -> Candidate:
    """The run's best model by the validation accuracy of its shipped epoch, as the gate
    needs it."""
    best = best_by_validation(
        {name: {"history": r.history, "best_epoch": r.best_epoch} for name, r in trained.items()}
    )
    model = trained[best]
    shipped = {"history": model.history, "best_epoch": model.best_epoch}
    return Candidate(
        name=best,
        path=str(layout.resolve(model.dir) / MODEL_FILE),
        epoch=model.best_epoch,
        val_accuracy=shipped_val_accuracy(shipped),
        test_accuracy=evaluated[best].accuracy,
        predictions=evaluated[best].predictions,
        image_size=arrays[best].image_size,
        code=code,
        class_recall={c: m["recall"] for c, m in evaluated[best].per_class.items()},
    )


def split_facts(split: Manifest, split_record: SplitRecord, manifest: ManifestRecord) -> SplitFacts:
    """What the promotion gate needs to know of a run's split."""
    from catdog.data.images import DecodedOnDemand

    test = split.in_split("test")
    return SplitFacts(
        split_hash=split_record.split_hash,
        data_hash=manifest.manifest_hash,
        classes=list(split.classes),
        test_labels=[entry.label for entry in test],
        test_hashes=[entry.sha256 for entry in test],
        seen_hashes=[
            entry.sha256 for entry in split.images if entry.split in ("train", "validation")
        ],
        test_images=lambda side: DecodedOnDemand(split.paths(test), side),
    )


def _predictions_file(split: SplitFacts) -> str:
    """Beside an archived model: its predictions on one split's test images."""
    return f"predictions-{split.split_hash[:16]}.json"


def _production_predictions(layout: Layout, current: Production, split: SplitFacts) -> list[int]:
    """Production's predictions on this split's test images, computed once per split."""
    kept = registry.archive_file(layout, current.archive, _predictions_file(split))
    if kept.is_file():
        return list(read_json(kept))
    from catdog.evaluation import load_model, score_model

    model = load_model(registry.archive_path(layout, current))
    images = split.test_images(int(model.input_shape[1]))
    predictions = score_model(model, images, split.test_labels, split.classes)["predictions"]
    atomic_write_json(kept, predictions)
    return predictions


def _judge(
    layout: Layout,
    current: Production | None,
    candidate: Candidate,
    split: SplitFacts,
    policy: Policy,
) -> tuple[Decision, Evidence | None]:
    floor = below_a_floor(candidate, policy)
    if floor is not None:
        return floor, None
    if current is None:
        return Decision(True, f"{candidate.name} is the first production model", "first"), None
    seen_file = registry.archive_file(layout, current.archive, SEEN_FILE)
    seen = set(read_json(seen_file) if seen_file.is_file() else [])
    overlap = len(seen.intersection(split.test_hashes))
    if overlap:
        return (
            Decision(
                False,
                f"not compared: production ({current.model}) trained or was selected on "
                f"{overlap} of this run's {len(split.test_hashes)} test images (the seed or "
                "the split changed), so this split cannot score it fairly; kept production",
                "not_comparable",
            ),
            None,
        )
    production = _production_predictions(layout, current, split)
    evidence = compare(candidate.predictions, production, split.test_labels)
    decision = decide(
        evidence.candidate_accuracy,
        evidence.production_accuracy,
        margin=policy.margin,
        candidate_name=candidate.name,
    )
    detail = (
        f"; they disagree on {evidence.disagreements} of {len(split.test_labels)} test images "
        f"({evidence.candidate_only} right by the candidate only, {evidence.production_only} "
        f"by production only), McNemar p = {evidence.p_value:.3g}"
    )
    chance = policy.max_p_value is not None and evidence.p_value > policy.max_p_value
    if decision.promote and chance:
        return (
            Decision(
                False,
                f"kept production: {candidate.name} scores {evidence.candidate_accuracy:.4f} "
                f"against production's {evidence.production_accuracy:.4f}, but McNemar p = "
                f"{evidence.p_value:.3g} is above {policy.max_p_value:g} (--max-p-value): "
                "no more than chance on these images" + detail,
                "max_p_value",
            ),
            evidence,
        )
    return Decision(decision.promote, decision.reason + detail, decision.rule), evidence


def _record(
    decision: Decision,
    evidence: Evidence | None,
    candidate: Candidate,
    policy: Policy,
    **extra: Any,
) -> PromotionRecord:
    """The gate's decision as the record the flow, the report and the events read."""
    return PromotionRecord(
        promoted=decision.promote,
        reason=decision.reason,
        candidate=candidate.name,
        candidate_epoch=candidate.epoch,
        margin=policy.margin,
        rule=decision.rule,
        policy=asdict(policy),
        candidate_accuracy=evidence.candidate_accuracy if evidence else None,
        production_accuracy=evidence.production_accuracy if evidence else None,
        evidence=asdict(evidence) if evidence else None,
        **extra,
    )


def _held(decision: Decision, candidate: Candidate, hold: str | None) -> Decision:
    """A promotion that failed data checks under --on-data-issue hold keeps production."""
    if not decision.promote or not hold:
        return decision
    return Decision(
        False,
        f"kept production: {candidate.name} would be promoted ({decision.reason}), but {hold} "
        "(--on-data-issue hold)",
        "data_checks",
    )


def propose(
    layout: Layout,
    candidate: Candidate,
    split: SplitFacts,
    policy: Policy,
    hold: str | None = None,
) -> PromotionRecord:
    """What the gate would decide for `candidate` now (to ask a person first); nothing is
    written."""
    with exclusive_lock(layout.gate_lock):
        current = registry.read(layout).production
        decision, evidence = _judge(layout, current, candidate, split, policy)
        decision = _held(decision, candidate, hold)
    return _record(decision, evidence, candidate, policy)


Ship = Callable[[Candidate, Path], ExportCheck]  # exports the candidate into a folder, checked


def promote(
    layout: Layout,
    candidate: Candidate,
    split: SplitFacts,
    policy: Policy,
    run: dict[str, Any],
    ship: Ship | None = None,
    approval: dict[str, str] | None = None,
    hold: str | None = None,
    reference: Mapping[str, Path] | None = None,
) -> PromotionRecord:
    """Apply the gate to `candidate` and record the decision; on promotion, install it as
    production. Runs on one artifacts folder take turns here.

    Args:
        layout: The artifacts folder.
        candidate: The run's best model.
        split: This run's test split and what its models trained on.
        policy: What the candidate must meet (a margin over production, floors).
        run: "id" and "name" of this run, recorded with the decision.
        ship: Writes the candidate's exports into a folder and checks them; a candidate
            whose exports fail their check is not promoted. None: no exports.
        approval: When a person was asked: {"outcome": "approved", "rejected" or "timed out",
            "by": who}; only "approved" lets the candidate through.
        hold: Why the run's data holds production back (failed data checks under
            --on-data-issue hold); None lets the gate decide.
        reference: Files describing the candidate's training data (name -> path), kept beside
            its archive as `<archive>.<name>` for later runs' data checks.

    Returns:
        The decision and its evidence, for summary.json and the report.
    """
    with exclusive_lock(layout.gate_lock):
        now = registry.read(layout)
        decision, evidence = _judge(layout, now.production, candidate, split, policy)
        decision = _held(decision, candidate, hold)
        if decision.promote and approval is not None and approval.get("outcome") != "approved":
            by = f" by {approval['by']}" if approval.get("by") else ""
            decision = Decision(
                False,
                f"kept production: {candidate.name} would be promoted ({decision.reason}), but "
                f"the promotion was {approval.get('outcome', 'not approved')}{by}",
                "approval",
            )
        exports, check = None, None
        if decision.promote and ship is not None:
            exports, check = _ship(layout, candidate, len(now.history), ship)
            if exports is None:
                decision = Decision(
                    False,
                    f"kept production: {candidate.name} would be promoted ({decision.reason}), "
                    f"but its exports failed their check: {check.reason()}",
                    "exports",
                )
        entry: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "action": "promote" if decision.promote else "keep",
            "candidate": candidate.name,
            "candidate_epoch": candidate.epoch,
            "reason": decision.reason,
            "rule": decision.rule,
            "policy": asdict(policy),
            "margin": policy.margin,
            "evidence": asdict(evidence) if evidence else None,
            # the entry whose model was in production
            "replaced": now.production.entry if now.production else None,
            "run_id": run["id"],
            "flow_run": run.get("name"),
            "export_check": check.to_json() if check else None,
            "approval": approval,
        }
        installed = None
        if decision.promote:
            installed = _install(
                layout, candidate, split, run, len(now.history), exports, reference
            )
            entry.update(installed.facts())
        registry.record(layout, now, entry, installed)
    return _record(
        decision,
        evidence,
        candidate,
        policy,
        export_check=check.to_json() if check else None,
        approval=approval,
    )


def _ship(
    layout: Layout, candidate: Candidate, number: int, ship: Ship
) -> tuple[str | None, ExportCheck]:
    """Export the candidate beside its archive and check it; the folder (relative to the
    artifacts root) if the exports passed, None (and nothing left behind) if not."""
    folder = layout.production_archive_export(number, candidate.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staged = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    try:
        try:
            check = ship(candidate, staged)
        except Exception as error:  # an export that cannot be made keeps production, saying why
            problem = f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]
            failed = RuntimeCheck("export", False, problem=problem)
            return None, ExportCheck(
                images=len(candidate.predictions), tolerance=0.0, runtimes=[failed]
            )
        if not check.passed:
            return None, check
        replace_directory(staged, folder)  # one a crashed gate left there is replaced
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return layout.relative(folder), check


def _install(
    layout: Layout,
    candidate: Candidate,
    split: SplitFacts,
    run: dict[str, Any],
    number: int,
    exports: str | None,
    reference: Mapping[str, Path] | None = None,
) -> Production:
    """Archive the candidate's file and facts under production/models, as the next production."""
    extras: dict[str, Any] = {
        SEEN_FILE: sorted(split.seen_hashes),
        _predictions_file(split): list(candidate.predictions),
        **{name: Path(path) for name, path in (reference or {}).items()},
    }
    archive = registry.archive(layout, number, candidate.name, Path(candidate.path), extras)
    return Production(
        model=candidate.name,
        epoch=candidate.epoch,
        archive=archive,
        source=candidate.path,
        test_accuracy=candidate.test_accuracy,
        val_accuracy=candidate.val_accuracy,
        data_hash=split.data_hash,
        split_hash=split.split_hash,
        classes=list(split.classes),
        image_size=candidate.image_size,
        code=candidate.code,
        run_id=run["id"],
        flow_run=run.get("name"),
        exports=exports,
    )
