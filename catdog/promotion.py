"""The promotion gate: a new model replaces production only when it is measurably better."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from catdog.io import atomic_write_json, read_json
from catdog.layout import Layout

TestImages = Callable[[int], tuple[np.ndarray, np.ndarray]]  # input side -> (images, labels)


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


def best_by_validation(models: dict[str, dict[str, Any]]) -> str:
    """The model with the highest final validation accuracy; test accuracy is never consulted."""
    return max(models, key=lambda name: models[name]["history"]["val_accuracy"][-1])


def production_accuracy(
    layout: Layout, registry: dict[str, Any], split: dict[str, Any], test_images: TestImages
) -> float:
    """Production's accuracy on this run's test split, re-measured if the split changed.

    Re-measured at production's own input size, which need not be any size this run decoded.
    """
    if registry.get("split_hash") == split["split_hash"]:
        return float(registry["test_accuracy"])
    from catdog.evaluation import load_model, score_model

    model = load_model(layout.production_model)
    images, labels = test_images(int(model.input_shape[1]))
    return float(score_model(model, images, labels, list(split["classes"]))["accuracy"])


def promote(
    layout: Layout,
    name: str,
    model: dict[str, Any],
    split: dict[str, Any],
    margin: float,
    run_id: str,
    test_images: TestImages,
) -> dict[str, Any]:
    """Apply the gate to candidate `name`; on promotion, replace production's model and
    registry, each atomically.

    Args:
        layout: The artifacts folder.
        name: The candidate model's name.
        model: Its summary entry ("path", "test_accuracy", "history", "image_size").
        split: The split record of this run ("split_hash", "classes").
        margin: Accuracy the candidate must gain over production.
        run_id: This run's identity, recorded in the registry.
        test_images: The test split's images at a given input side.

    Returns:
        The decision, for summary.json.
    """
    registry = read_json(layout.registry) if layout.registry.is_file() else None
    current = production_accuracy(layout, registry, split, test_images) if registry else None
    decision = decide(model["test_accuracy"], current, margin=margin, candidate_name=name)
    if decision.promote:
        layout.production_dir.mkdir(parents=True, exist_ok=True)
        staged = layout.production_dir / f".{layout.production_model.name}.tmp"
        shutil.copyfile(model["path"], staged)
        staged.replace(layout.production_model)
        atomic_write_json(
            layout.registry,
            {
                "model": name,
                "path": str(layout.production_model),
                "source": model["path"],
                "test_accuracy": model["test_accuracy"],
                "val_accuracy": model["history"]["val_accuracy"][-1],
                "split_hash": split["split_hash"],
                "classes": split["classes"],
                "image_size": model["image_size"],
                "run_id": run_id,
                "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
    return {
        "promoted": decision.promote,
        "reason": decision.reason,
        "candidate": name,
        "production_accuracy": current,
        "margin": margin,
    }
