"""The promotion gate: the run's best model against production (see `catdog.registry`).

A new best model (`catdog.candidates`) replaces production only when, scored with production on
the same current test split, it meets the policy: better by more than a margin and, where set,
above an accuracy floor, above a recall floor on every class and significant under an exact
McNemar test; the decision names the rule that decided and states both accuracies and the images
on which the two disagree. A person's approval, when asked for, and exports that pass their check
come on top (see `promote`). Runs take turns at the gate (an OS file lock), and every decision is
appended to the registry's history, so production can be rolled back to the model it replaced.

The policy, the evidence and a person's answer are parts of the record the gate returns, so they
are defined with it (`catdog.stage_records`): the flow, the report and the registry read them.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from uuid import uuid4

import numpy as np

from catdog import registry
from catdog.candidates import Candidate, SplitFacts
from catdog.export import ExportCheck, export_into
from catdog.layout import Layout
from catdog.mirror import TURNS, production_turn
from catdog.registry import Production, RunIdentity
from catdog.stage_records import Approval, Evidence, Policy, PromotionRecord
from catdog.store import StoreConflict


@dataclass(frozen=True)
class Decision:
    """What the gate decided, and the rule and evidence it decided by."""

    promote: bool
    reason: str
    # Which rule decided: "first", "margin", "min_accuracy", "min_class_recall",
    # "max_p_value", "not_comparable" (production saw test images), "data_checks", "exports"
    # or "approval".
    rule: str = "margin"
    evidence: Evidence | None = None  # None: not compared with production


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


def paired_evidence(
    candidate: Sequence[int], production: Sequence[int], labels: Sequence[int]
) -> Evidence:
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


# Production is compared with a candidate on the test images it never trained or was selected
# on, unless it saw more than this share of them. A dataset that grew by 5% moved 7 of 1,194
# (0.6%) into the test split; a changed seed or split moves most of them, and what is left is
# no longer the test split people chose.
MAX_SEEN_SHARE = 0.1


def _judge(
    layout: Layout,
    current: Production | None,
    candidate: Candidate,
    split: SplitFacts,
    policy: Policy,
) -> Decision:
    floor = below_a_floor(candidate, policy)
    if floor is not None:
        return floor
    if current is None:
        return Decision(True, f"{candidate.name} is the first production model", "first")
    seen = registry.seen_among(layout, current, split.test_hashes)
    if len(seen) > len(split.test_hashes) * MAX_SEEN_SHARE:
        return Decision(
            False,
            f"not compared: production ({current.model}) trained or was selected on "
            f"{len(seen)} of this run's {len(split.test_hashes)} test images (the seed or "
            "the split changed), so this split cannot score it fairly; kept production",
            "not_comparable",
        )
    production, computed = registry.production_predictions(layout, current, split)
    # Both are scored on the images neither trained nor was selected on.
    rows = [row for row, digest in enumerate(split.test_hashes) if digest not in seen]
    evidence = replace(
        paired_evidence(
            [candidate.predictions[row] for row in rows],
            [production[row] for row in rows],
            [split.test_labels[row] for row in rows],
        ),
        production_computed=computed,
        left_out=len(seen),
    )
    decision = decide(
        evidence.candidate_accuracy,
        evidence.production_accuracy,
        margin=policy.margin,
        candidate_name=candidate.name,
    )
    left_out = (
        f", leaving out the {len(seen)} that production trained or was selected on" if seen else ""
    )
    detail = (
        f"; they disagree on {evidence.disagreements} of {len(rows)} test images{left_out} "
        f"({evidence.candidate_only} right by the candidate only, {evidence.production_only} "
        f"by production only), McNemar p = {evidence.p_value:.3g}"
    )
    chance = policy.max_p_value is not None and evidence.p_value > policy.max_p_value
    if decision.promote and chance:
        return Decision(
            False,
            f"kept production: {candidate.name} scores {evidence.candidate_accuracy:.4f} "
            f"against production's {evidence.production_accuracy:.4f}, but McNemar p = "
            f"{evidence.p_value:.3g} is above {policy.max_p_value:g} (--max-p-value): "
            "no more than chance on these images" + detail,
            "max_p_value",
            evidence,
        )
    return Decision(decision.promote, decision.reason + detail, decision.rule, evidence)


def _unless(decision: Decision, candidate: Candidate, but: str, rule: str) -> Decision:
    """A promotion that something besides the scores stops (`but` says what) keeps production."""
    if not decision.promote:
        return decision
    reason = f"kept production: {candidate.name} would be promoted ({decision.reason}), {but}"
    return replace(decision, promote=False, reason=reason, rule=rule)


def _record(decision: Decision, candidate: Candidate, policy: Policy) -> PromotionRecord:
    """The gate's decision as the record the flow, the report and the events read."""
    evidence = decision.evidence
    return PromotionRecord(
        promoted=decision.promote,
        reason=decision.reason,
        rule=decision.rule,
        candidate_accuracy=evidence.candidate_accuracy if evidence else None,
        production_accuracy=evidence.production_accuracy if evidence else None,
        evidence=evidence,
        candidate=candidate.name,
        candidate_epoch=candidate.epoch,
        policy=policy,
        margin=policy.margin,
        export_check=None,  # what `promote` adds once it has shipped the candidate
        approval=None,
    )


def _held(decision: Decision, candidate: Candidate, hold: str | None) -> Decision:
    """A promotion that failed data checks under --on-data-issue hold keeps production."""
    if not hold:
        return decision
    return _unless(decision, candidate, f"but {hold} (--on-data-issue hold)", "data_checks")


def propose(
    layout: Layout,
    candidate: Candidate,
    split: SplitFacts,
    policy: Policy,
    hold: str | None = None,
) -> PromotionRecord:
    """What the gate would decide for `candidate` now (to ask a person first); nothing is
    written."""
    with production_turn(layout):
        current = registry.read(layout).production
        decision = _judge(layout, current, candidate, split, policy)
    return _record(_held(decision, candidate, hold), candidate, policy)


Ship = Callable[[Candidate, Path], ExportCheck]  # exports the candidate into a folder, checked


class _ShippedOnce:
    """A candidate's exports, made and checked once for every turn of its promotion.

    A turn that lost production to another host (StoreConflict) decides again on the new
    registry; the candidate's exports do not depend on it, and making and checking them again
    in fresh processes would cost seconds. The first passing exports are copied into `keep`,
    and a later turn gets that copy and the same check.
    """

    def __init__(self, ship: Ship, keep: Path) -> None:
        self.ship = ship
        self.keep = keep
        self.check: ExportCheck | None = None

    def __call__(self, candidate: Candidate, staged: Path) -> ExportCheck:
        if self.check is None:
            check = self.ship(candidate, staged)
            if check.passed:
                shutil.copytree(staged, self.keep)
            self.check = check
        elif self.check.passed:
            shutil.copytree(self.keep, staged, dirs_exist_ok=True)
        return self.check


def promote(
    layout: Layout,
    candidate: Candidate,
    split: SplitFacts,
    policy: Policy,
    run: RunIdentity,
    *,
    ship: Ship | None = None,
    approval: Approval | None = None,
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
        run: This run's id and name, recorded with the decision.
        ship: Writes the candidate's exports into a folder and checks them; a candidate
            whose exports fail their check is not promoted. None: no exports.
        approval: When a person was asked, their answer; only "approved" lets the candidate
            through.
        hold: Why the run's data holds production back (failed data checks under
            --on-data-issue hold); None lets the gate decide.
        reference: Files describing the candidate's training data (name -> path), kept beside
            its archive as `<archive>.<name>` for later runs' data checks.

    Returns:
        The decision and its evidence, for summary.json and the report.
    """
    keep = layout.production_dir / "models" / f".{candidate.name}.{uuid4().hex}.shipped.tmp"
    once = _ShippedOnce(ship, keep) if ship is not None else None
    try:
        for _ in range(TURNS - 1):
            with contextlib.suppress(StoreConflict):  # another host changed production first
                return _promote(
                    layout, candidate, split, policy, run, once, approval, hold, reference
                )
        return _promote(layout, candidate, split, policy, run, once, approval, hold, reference)
    finally:
        shutil.rmtree(keep, ignore_errors=True)


def _promote(
    layout: Layout,
    candidate: Candidate,
    split: SplitFacts,
    policy: Policy,
    run: RunIdentity,
    ship: Ship | None,
    approval: Approval | None,
    hold: str | None,
    reference: Mapping[str, Path] | None,
) -> PromotionRecord:
    with production_turn(layout):
        now = registry.read(layout)
        decision = _held(_judge(layout, now.production, candidate, split, policy), candidate, hold)
        if approval is not None and approval.outcome != "approved":
            by = f" by {approval.by}" if approval.by else ""
            decision = _unless(
                decision, candidate, f"but the promotion was {approval.outcome}{by}", "approval"
            )
        exports, check = None, None
        # In a store, hosts deciding at once must not write the same names: each turn's own.
        label = candidate.name if layout.store is None else f"{candidate.name}-{uuid4().hex[:8]}"
        if decision.promote and ship is not None:
            folder = layout.production_archive_export(len(now.history), label)
            check = export_into(
                folder, lambda staged: ship(candidate, staged), len(candidate.predictions)
            )
            if check.passed:
                exports = layout.relative(folder)
            else:
                but = f"but its exports failed their check: {check.reason()}"
                decision = _unless(decision, candidate, but, "exports")
        record = _record(decision, candidate, policy)
        record = replace(record, export_check=check, approval=approval)
        installed = None
        if decision.promote:
            installed = registry.install(
                layout, len(now.history), candidate, split, run, exports, reference, label
            )
        registry.record_decision(layout, now, record, run, installed)
    return record
