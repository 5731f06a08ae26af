"""The promotion gate: a new model replaces production only when it is measurably better."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


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
        return Decision(True, f"{candidate_name} is the first production model")
    gain = candidate_accuracy - production_accuracy
    if gain > margin:
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


def best_by_validation(models: dict[str, dict[str, Any]]) -> str:
    """The model with the highest final validation accuracy; test accuracy is never consulted."""
    return max(models, key=lambda name: models[name]["history"]["val_accuracy"][-1])
