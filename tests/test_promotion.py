"""The promotion gate and best-model selection, on plain records."""

from __future__ import annotations

import pytest

from catdog.promotion import best_by_validation, decide


def model(*val_accuracy: float, test: float = 0.5) -> dict:
    return {"history": {"val_accuracy": list(val_accuracy)}, "test_accuracy": test}


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
