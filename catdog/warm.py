"""Warm starts: which of a run's models may start from production's weights (no TensorFlow).

`--warm-start production` starts a model's training from the production model's weights when
production is that same catalog model (same builder, same classes); `catdog.training` then
checks that the weights fit, shape by shape, and starts cold, saying why, when they do not. A
model that production is not, or one that continues another model (fine-tuning), starts cold,
and the run says so: a warm start is never silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from catdog import catalog, registry
from catdog.hashing import HashMemo, sha256_file
from catdog.layout import Layout

WarmStartSource = Literal["none", "production"]


@dataclass(frozen=True)
class WarmStart:
    """Production's model file, to start a training from; its hash keys that training."""

    model_file: str
    sha256: str
    about: str  # "production (model1, epoch 12, decision 3)"


def production_start(layout: Layout, name: str) -> WarmStart | str:
    """Production's model, when model `name` can start from it; else why it starts cold."""
    if catalog.spec(name).starts_from:
        return f"{name} continues {catalog.spec(name).starts_from}'s training: it starts from that"
    production = registry.read(layout).production
    if production is None:
        return "there is no production model yet"
    if production.model != name:
        return f"production is {production.model}, not {name}"
    model_file = registry.archive_path(layout, production)
    about = (
        f"production ({production.model}, epoch {production.epoch}, decision {production.entry})"
    )
    digest = sha256_file(model_file, HashMemo(layout.hash_memo))
    return WarmStart(str(model_file), digest, about)
