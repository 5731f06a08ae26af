"""The promotion gate and best-model selection, on plain records."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from catdog.candidates import best_by_validation
from catdog.gate import decide


def model(*val_accuracy: float, test: float = 0.5) -> SimpleNamespace:
    """A trained model whose file holds its last epoch (best_epoch 0)."""
    history = {"val_accuracy": list(val_accuracy)}
    return SimpleNamespace(history=history, best_epoch=0, test_accuracy=test)


def test_first_model_is_promoted():
    decision = decide(0.6, None, margin=0.0, candidate_name="model2")
    assert decision.promote and "first production model" in decision.reason


@pytest.mark.parametrize(
    ("candidate", "production", "margin", "promote"),
    [
        (0.80, 0.70, 0.0, True),
        (0.80, 0.70, 0.05, True),
        (0.80, 0.70, 0.10, False),  # a gain equal to the margin is not above it
        (0.70, 0.70, 0.0, False),
        (0.65, 0.70, 0.0, False),
    ],
)
def test_gate_promotes_only_above_the_margin(candidate, production, margin, promote):
    decision = decide(candidate, production, margin=margin, candidate_name="model3")
    assert decision.promote is promote
    assert f"{candidate:.4f}" in decision.reason and f"{production:.4f}" in decision.reason
    assert ("kept production" in decision.reason) is not promote


def test_best_model_is_chosen_by_last_validation_accuracy_never_by_test():
    models = {
        "a": model(0.90, 0.60, test=0.99),  # best epoch high, last epoch low, best test
        "b": model(0.70, 0.75, test=0.50),
        "c": model(0.74, test=0.90),
    }
    assert best_by_validation(models) == "b"


def test_best_model_tie_keeps_the_first():
    assert best_by_validation({"x": model(0.8), "y": model(0.8)}) == "x"


# ----------------------------------------------------------------------------- the gate on files

import json  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from catdog.candidates import Candidate, SplitFacts  # noqa: E402
from catdog.errors import CatdogError  # noqa: E402
from catdog.gate import mcnemar_exact, paired_evidence, promote  # noqa: E402
from catdog.layout import Layout  # noqa: E402
from catdog.registry import read as read_registry  # noqa: E402
from catdog.registry import rollback  # noqa: E402
from catdog.stage_records import Policy  # noqa: E402

LABELS = [0, 1] * 10


def split(split_hash: str = "s1", test=("t",), seen=("a", "b")) -> SplitFacts:
    def no_decoding(side: int):
        raise AssertionError("production's predictions on this split are on file")

    return SplitFacts(
        split_hash=split_hash,
        data_hash="d1",
        classes=["cats", "dogs"],
        test_labels=LABELS,
        test_hashes=[f"{t}{i}" for t in test for i in range(len(LABELS) // len(test))],
        seen_hashes=list(seen),
        test_images=no_decoding,
    )


def candidate(tmp_path: Path, name: str, right: int) -> Candidate:
    """A candidate that classifies the first `right` test images correctly."""
    path = tmp_path / f"{name}-{right}.keras"
    path.write_bytes(f"{name} {right}".encode())
    predictions = [y if i < right else 1 - y for i, y in enumerate(LABELS)]
    return Candidate(name, str(path), 3, 0.7, right / len(LABELS), predictions, 32, "code")


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)  # all five disagreements one way
    assert mcnemar_exact(1, 4) == pytest.approx(2 * 6 / 32)  # P(X <= 1) for Bin(5, 1/2)


def test_compare_counts_disagreements_both_ways():
    evidence = paired_evidence([0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 1])
    assert (evidence.candidate_accuracy, evidence.production_accuracy) == (0.5, 0.5)
    assert (evidence.candidate_only, evidence.production_only, evidence.disagreements) == (1, 1, 2)
    with pytest.raises(ValueError):
        paired_evidence([0], [0, 1], [0, 1])


def test_better_by_the_margin_is_promoted_equal_or_worse_is_not(tmp_path):
    layout = Layout.at(tmp_path / "artifacts")
    run = {"id": "r1", "name": "first"}
    assert promote(layout, candidate(tmp_path, "model1", 12), split(), Policy(0.0), run).promoted
    for right, margin, promoted in ((12, 0.0, False), (10, 0.0, False), (16, 0.25, False)):
        decision = promote(
            layout, candidate(tmp_path, "model2", right), split(), Policy(margin), run
        )
        assert decision.promoted is promoted, decision
    decision = promote(layout, candidate(tmp_path, "model3", 16), split(), Policy(0.1), run)
    assert decision.promoted is True
    assert decision.evidence.disagreements == 4 and decision.evidence.candidate_only == 4
    registry = read_registry(layout)
    assert registry.production.model == "model3"
    assert layout.production_model.read_bytes() == b"model3 16"
    assert [e["action"] for e in registry.history] == [
        "promote",
        "keep",
        "keep",
        "keep",
        "promote",
    ]


def test_production_that_saw_most_test_images_is_not_compared(tmp_path):
    layout = Layout.at(tmp_path / "artifacts")
    run = {"id": "r1"}
    seen = ("t0", "t1", "t2")  # 3 of the 20, more than a tenth: a changed seed or split
    promote(layout, candidate(tmp_path, "model1", 10), split(seen=seen), Policy(0.0), run)
    decision = promote(layout, candidate(tmp_path, "model2", 20), split("s2"), Policy(0.0), run)
    assert decision.promoted is False and decision.evidence is None
    assert "trained or was selected on 3 of this run's 20 test images" in decision.reason
    assert read_registry(layout).production.model == "model1"


def test_production_that_saw_a_few_test_images_is_compared_on_the_others(tmp_path):
    # A dataset that grew moves a few validation images into the test split.
    layout = Layout.at(tmp_path / "artifacts")
    run = {"id": "r1"}
    promote(layout, candidate(tmp_path, "model1", 10), split(seen=("t3", "x")), Policy(0.0), run)
    decision = promote(layout, candidate(tmp_path, "model2", 20), split("s2"), Policy(0.0), run)
    # On the 19 others: production right on the first 10 but t3, the candidate on all 19.
    assert decision.promoted is True
    assert decision.evidence.left_out == 1
    assert decision.evidence.production_accuracy == pytest.approx(9 / 19)
    assert decision.evidence.candidate_accuracy == 1.0
    assert decision.evidence.production_computed == 0  # kept by image since its promotion
    assert "disagree on 10 of 19 test images, leaving out the 1 that production trained" in (
        decision.reason
    )
    assert read_registry(layout).production.model == "model2"


def test_rollback_restores_what_production_replaced_then_what_that_replaced(tmp_path):
    layout = Layout.at(tmp_path / "artifacts")
    run = {"id": "r"}
    with pytest.raises(CatdogError, match="no production model"):
        rollback(layout)
    for right in (10, 14, 18):
        assert promote(
            layout, candidate(tmp_path, "model1", right), split(), Policy(0.0), run
        ).promoted
    rollback(layout)
    assert layout.production_model.read_bytes() == b"model1 14"
    rollback(layout)
    assert layout.production_model.read_bytes() == b"model1 10"
    before = layout.registry.read_bytes()
    with pytest.raises(CatdogError, match="nothing before it to roll back to"):
        rollback(layout)
    assert layout.registry.read_bytes() == before  # a refused rollback changes nothing
    # The gate now judges against the restored model: 14 right beats its 10.
    assert promote(layout, candidate(tmp_path, "model2", 14), split(), Policy(0.0), run).promoted


def test_concurrent_runs_take_turns_and_every_decision_is_kept(tmp_path):
    layout = Layout.at(tmp_path / "artifacts")
    errors: list[BaseException] = []

    def run_gate(number: int) -> None:
        try:
            promote(
                layout,
                candidate(tmp_path, f"m{number}", 10 + number % 5),
                split(),
                Policy(0.0),
                {"id": str(number)},
            )
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run_gate, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    registry = json.loads(layout.registry.read_text())
    assert sorted(int(e["run_id"]) for e in registry["history"]) == list(range(16))
    # Each promotion beat the production model current when it ran.
    installed = [e for e in registry["history"] if e["action"] == "promote"]
    accuracies = [e["test_accuracy"] for e in installed]
    assert accuracies == sorted(set(accuracies))
    assert not list(layout.production_dir.rglob("*.tmp"))


# ----------------------------------------------------------------------------- the policy


def test_each_rule_of_the_policy_decides_and_says_so(tmp_path):
    from catdog.gate import below_a_floor

    def with_recall(right: int, recall: dict[str, float]) -> Candidate:
        return Candidate(
            "model2", "x.keras", 3, 0.7, right / len(LABELS), [], 32, "c", class_recall=recall
        )

    balanced = {"cats": 0.8, "dogs": 0.8}
    assert below_a_floor(with_recall(16, balanced), Policy()) is None
    decision = below_a_floor(with_recall(16, balanced), Policy(min_accuracy=0.85))
    assert decision.rule == "min_accuracy" and "under the floor of 0.8500" in decision.reason
    lopsided = {"cats": 1.0, "dogs": 0.4}
    decision = below_a_floor(with_recall(14, lopsided), Policy(min_class_recall=0.5))
    assert decision.rule == "min_class_recall" and "dogs 0.4000" in decision.reason
    assert "cats" not in decision.reason
    assert below_a_floor(with_recall(14, lopsided), Policy(min_class_recall=0.4)) is None


def test_a_better_candidate_with_a_class_under_the_recall_floor_keeps_production(tmp_path):
    layout = Layout.at(tmp_path / "artifacts")
    run = {"id": "r"}
    first = candidate(tmp_path, "model1", 10)
    assert promote(layout, first, split(), Policy(), run).rule == "first"
    # Better overall (16 of 20 right against 10), but with a recall of 0.6 on dogs.
    better = candidate(tmp_path, "model2", 16)
    lopsided = Candidate(**{**better.__dict__, "class_recall": {"cats": 1.0, "dogs": 0.6}})
    decision = promote(layout, lopsided, split(), Policy(min_class_recall=0.7), run)
    assert not decision.promoted and decision.rule == "min_class_recall"
    registry = read_registry(layout)
    assert registry.production.model == "model1"
    assert registry.history[-1]["rule"] == "min_class_recall"
    assert registry.history[-1]["policy"]["min_class_recall"] == 0.7
    # Without the floor the same candidate is promoted, on the margin rule.
    assert promote(layout, lopsided, split(), Policy(), run).rule == "margin"


def test_a_gain_no_bigger_than_chance_keeps_production_under_max_p_value(tmp_path):
    layout = Layout.at(tmp_path / "artifacts")
    run = {"id": "r"}
    promote(layout, candidate(tmp_path, "model1", 10), split(), Policy(), run)
    slightly = candidate(tmp_path, "model2", 12)  # 2 more right: p = 0.5
    decision = promote(layout, slightly, split(), Policy(max_p_value=0.05), run)
    assert not decision.promoted and decision.rule == "max_p_value"
    assert "McNemar p = 0.5 is above 0.05" in decision.reason
    clearly = candidate(tmp_path, "model3", 18)  # 8 more right, none lost: p = 2/256
    assert promote(layout, clearly, split(), Policy(max_p_value=0.05), run).promoted


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_each_run_tells_the_event_feed_what_the_gate_did(dataset_zip, tmp_path):
    import time

    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from tests.conftest import run_flow

    artifacts = tmp_path / "artifacts"
    first = run_flow(dataset_zip, artifacts)
    again = run_flow(dataset_zip, artifacts)
    wanted = EventFilter(
        event=EventNameFilter(prefix=["catdog.model."]),
        resource=EventResourceFilter(id=[f"catdog.production.{artifacts}"]),
    )
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while len(events := client.read_events(filter=wanted, limit=50).events) < 2:
            assert time.monotonic() < deadline, events
            time.sleep(0.5)
    by_name = {event.event: event for event in events}
    promoted, kept = by_name["catdog.model.promoted"], by_name["catdog.model.kept"]
    assert promoted.payload["candidate"] == "model1" and promoted.payload["rule"] == "first"
    assert kept.payload["reason"] == again["promotion"]["reason"]
    runs = {event.event: [r.id for r in event.related if r.role == "flow-run"] for event in events}
    assert runs["catdog.model.promoted"] == [f"prefect.flow-run.{first['run']['id']}"]
    assert runs["catdog.model.kept"] == [f"prefect.flow-run.{again['run']['id']}"]
