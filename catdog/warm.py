"""Warm starts: which of a run's models may start from production's weights (no TensorFlow).

`--warm-start production` starts a model's training from the production model's weights when
production is that same catalog model, trained on the same classes; `catdog.training` then
checks that the weights fit, shape by shape, and starts cold, saying why, when they do not. A
model that production is not, or one that continues another model (fine-tuning), starts cold,
and the run says so: a warm start is never silent.

A warm-started training is keyed by the content of the model it starts from. On the data
production itself was trained on, a model starts as production's training did (from the same
model, or cold), so that an unchanged rerun finds that training in the cache instead of
training production once more from its own weights after every promotion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from catdog import catalog, registry
from catdog.hashing import HashMemo, sha256_file
from catdog.io import read_json
from catdog.layout import RECORD_FILE, Layout

logger = logging.getLogger(__name__)

WarmStartSource = Literal["none", "production"]


@dataclass(frozen=True)
class WarmStart:
    """A model file to start a training from; its hash keys that training."""

    model_file: str  # relative to the artifacts root
    sha256: str
    about: str  # "production (model1, epoch 12, decision 3)"


def production_start(
    layout: Layout, name: str, data_hash: str = "", classes: list[str] | None = None
) -> WarmStart | str:
    """What model `name` starts from on data `data_hash` of `classes`: production's model,
    production's own start (on production's own data), or why it starts cold."""
    if catalog.spec(name).starts_from:
        return f"{name} continues {catalog.spec(name).starts_from}'s training: it starts from that"
    production = registry.read(layout).production
    if production is None:
        return "there is no production model yet"
    if production.model != name:
        return f"production is {production.model}, not {name}"
    if classes is not None and list(production.classes) != list(classes):
        return f"production's classes are {production.classes}, this data's {list(classes)}"
    if data_hash and production.data_hash == data_hash:
        return _start_of(layout, production)
    model_file = registry.archive_path(layout, production)
    try:
        digest = sha256_file(model_file, HashMemo(layout.hash_memo))
    except OSError as error:
        return f"production's model file cannot be read ({error})"
    about = (
        f"production ({production.model}, epoch {production.epoch}, decision {production.entry})"
    )
    return WarmStart(production.archive, digest, about)


def _start_of(layout: Layout, production: registry.Production) -> WarmStart | str:
    """What production's own training started from, read from its training record."""
    why = "production was trained on this very data"
    try:
        facts = read_json(Path(production.source).parent / RECORD_FILE)
    except (OSError, ValueError):
        return f"{why}, and its training record cannot be read"
    if not facts.get("warm_sha256"):
        return f"{why}, from no earlier model: as it was"
    return WarmStart(facts["warm_file"], facts["warm_sha256"], facts["warm_about"])


def warm_starts(
    layout: Layout, models: list[str], data_hash: str, classes: list[str]
) -> tuple[dict[str, WarmStart], dict[str, str]]:
    """For `--warm-start production`: what each model starts from, and why each other model
    starts cold (its training says so again if production's weights turn out not to fit)."""
    found: dict[str, WarmStart] = {}
    cold: dict[str, str] = {}
    for name in models:
        start = production_start(layout, name, data_hash, classes)
        if isinstance(start, str):
            logger.warning("%s: starts cold (--warm-start production): %s", name, start)
            cold[name] = start
        else:
            found[name] = start
    return found, cold
