"""The production registry: which model is production now, and every gate decision in order.

`production/registry.json` is read and written here only. It holds the current production
model's facts at the top level (with "entry", the index of the decision that made it current,
and "path", its archived file) and "history", every decision in order: promotions, refusals
("keep") and rollbacks. A registry whose history holds no promotion has no production model:
`read` then returns `production=None`, a state every reader handles, not an error.

Writing the registry is the commit point of a promotion or rollback: the archived model it
names is written before it, and `production/model.keras` and `production/export/` (copies for
people and tools that look there) after it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import NotRequired, TypedDict

from catdog.arrays import RowsAt
from catdog.candidates import Candidate, SplitFacts
from catdog.errors import CatdogError
from catdog.io import JsonObject, atomic_write_json, read_json, replace_directory
from catdog.layout import Layout
from catdog.mirror import TURNS, production_turn
from catdog.stage_records import PromotionRecord
from catdog.store import StoreConflict

# Beside an archived model: the images it trained or was selected on (their content hashes).
SEEN_FILE = "seen.json"

# One decision as recorded: {"time", "action", "reason", ...}; a promotion or rollback also holds
# the installed model's `Production.facts()`. Older entries lack newer keys, so readers use
# `.get` for anything but "time", "action" and "reason".
HistoryEntry = JsonObject


class RunIdentity(TypedDict):
    """The run that asked the gate, as its decisions record it."""

    id: str
    name: NotRequired[str | None]  # its Prefect flow run's name, if it has one


class RegistryError(CatdogError):
    """The production registry cannot do what was asked (e.g. nothing to roll back to)."""


@dataclass(frozen=True)
class Production:
    """The production model, as a promotion or rollback installed it."""

    model: str  # its catalog name
    epoch: int  # the epoch whose weights it holds
    archive: str  # its archived .keras file, relative to the artifacts root
    source: str  # the training folder's model.keras it was copied from
    test_accuracy: float
    val_accuracy: float
    data_hash: str  # manifest hash of the data it trained on
    split_hash: str
    classes: list[str]
    image_size: int
    code: str  # fingerprint of the code that trained it
    run_id: str
    flow_run: str | None
    exports: str | None  # its archived export folder (relative), None if it has none
    entry: int = -1  # index in the history of the decision that made it current

    @classmethod
    def from_json(cls, facts: HistoryEntry) -> Production:
        known = {f.name for f in fields(cls)}
        # Registries written before exports existed have no "exports" or "flow_run".
        given = {k: facts[k] for k in known & facts.keys()}
        return cls(**{"exports": None, "flow_run": None, **given})

    def facts(self) -> HistoryEntry:
        """The fields a history entry records about the model it installed."""
        return {k: v for k, v in asdict(self).items() if k != "entry"}


@dataclass(frozen=True)
class Registry:
    production: Production | None  # None: no promotion yet (or none left after refusals)
    history: list[HistoryEntry]  # every decision in order, as recorded

    @property
    def promotions(self) -> int:
        return sum(entry["action"] == "promote" for entry in self.history)


def read(layout: Layout) -> Registry:
    """The registry of `layout`'s artifacts folder; empty when there is none.

    Raises:
        RegistryError: The file exists but is not a registry catdog wrote.
    """
    path = layout.registry
    if not path.is_file():
        return Registry(None, [])
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        history = list(data["history"])
        production = Production.from_json(data) if data.get("model") else None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RegistryError(
            f"{path}: not a readable catdog registry ({type(error).__name__}: {error}); "
            "restore it from a backup or move it aside"
        ) from error
    return Registry(production, history)


def archive_path(layout: Layout, production: Production) -> Path:
    return layout.root / production.archive


def archive_file(layout: Layout, archive: str, name: str) -> Path:
    """A file kept beside an archived model: `<archive>.<name>` (its facts, its data reference)."""
    return layout.root / f"{archive}.{name}"


def write(layout: Layout, production: Production | None, history: list[HistoryEntry]) -> None:
    """Write the registry, then copy what it names current to `production/model.keras` and
    `production/export/`. The archived file it names is written before it, so a crash at any
    moment leaves a registry that describes files that exist."""
    current = (
        {**asdict(production), "path": str(archive_path(layout, production))} if production else {}
    )
    atomic_write_json(layout.registry, {**current, "history": history})
    if production is not None:
        _make_current(layout, production)


def _make_current(layout: Layout, production: Production) -> None:
    """Copy the archived model and its exports (if any) to where people look for them."""
    staged = layout.production_dir / f".{layout.production_model.name}.{uuid.uuid4().hex}.tmp"
    shutil.copyfile(archive_path(layout, production), staged)
    staged.replace(layout.production_model)
    current = layout.production_export
    if production.exports is None:  # a model without exports: none of another model's may stay
        shutil.rmtree(current, ignore_errors=True)
        return
    new = current.with_name(f".{current.name}.{uuid.uuid4().hex}.tmp")
    shutil.copytree(layout.root / production.exports, new)
    replace_directory(new, current)


def archive(
    layout: Layout,
    number: int,
    model: str,
    source: Path,
    extras: Mapping[str, Path | Sequence[str] | Sequence[int] | Mapping[str, int]],
) -> str:
    """Copy the `number`th promoted model's file into production/models, with `extras` beside it
    (name -> a Path to copy, or JSON data to write); returns the archive, relative to the root."""
    target = layout.production_archive(number, model)
    relative = layout.relative(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for name, content in extras.items():
        path = archive_file(layout, relative, name)
        if isinstance(content, Path):
            staged = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            shutil.copyfile(content, staged)
            staged.replace(path)
        else:
            atomic_write_json(path, content)
    staged = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    shutil.copyfile(source, staged)
    staged.replace(target)
    return relative


def rollback(layout: Layout) -> HistoryEntry:
    """Make the model that the current production model replaced current again.

    Returns:
        The registry entry recording the rollback.

    Raises:
        RegistryError: No production model, or none before it.
    """
    for _ in range(TURNS - 1):
        with contextlib.suppress(StoreConflict):  # another host changed production first
            return _rollback(layout)
    return _rollback(layout)


def _rollback(layout: Layout) -> HistoryEntry:
    with production_turn(layout):
        registry = read(layout)
        current, history = registry.production, registry.history
        if current is None:
            raise RegistryError(
                f"no production model in {layout.production_dir}: nothing to roll back"
            )
        replaced = history[current.entry].get("replaced")
        if replaced is None:
            raise RegistryError(
                f"production ({current.model}) is the first production model of "
                f"{layout.root}: there is nothing before it to roll back to"
            )
        target = Production.from_json(history[replaced])
        if not archive_path(layout, target).is_file() or (
            target.exports and not (layout.root / target.exports).is_dir()
        ):
            raise RegistryError(
                f"the earlier production model {target.archive} (entry {replaced}) is no "
                "longer archived: pruning (--keep-runs N, `cache prune --keep N`) keeps the "
                "last N production models"
            )
        entry = {
            **target.facts(),
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "action": "rollback",
            "reason": f"rolled back from {current.model} (entry {current.entry}) to "
            f"{target.model} (entry {replaced})",
            # Rolling back again goes to what the restored model had replaced.
            "replaced": history[replaced].get("replaced"),
        }
        history = [*history, entry]
        write(layout, _current(target, len(history) - 1), history)
    return entry


def _current(production: Production, entry: int) -> Production:
    return Production(**{**asdict(production), "entry": entry})


def record(
    layout: Layout, registry: Registry, entry: HistoryEntry, installed: Production | None
) -> None:
    """Append a gate decision to `registry` (as read under the gate's lock, which the caller
    holds); `installed` (a promotion) becomes production."""
    history = [*registry.history, entry]
    production = _current(installed, len(history) - 1) if installed else registry.production
    write(layout, production, history)


def record_decision(
    layout: Layout,
    registry: Registry,
    decision: PromotionRecord,
    run: RunIdentity,
    installed: Production | None,
) -> None:
    """Append the gate's decision on `registry` (read under the gate's lock, which the caller
    holds): the decision, the run, the entry of the model it judged against, and on a promotion
    the installed model's facts; `installed` becomes production."""
    facts = decision.to_json()
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "action": "promote" if decision.promoted else "keep",
        **{key: facts[key] for key in ("candidate", "candidate_epoch", "reason", "rule")},
        **{key: facts[key] for key in ("policy", "margin", "evidence")},
        # the entry whose model was in production
        "replaced": registry.production.entry if registry.production else None,
        "run_id": run["id"],
        "flow_run": run.get("name"),
        "export_check": facts["export_check"],
        "approval": facts["approval"],
    }
    record(layout, registry, {**entry, **(installed.facts() if installed else {})}, installed)


def predictions_file(split: SplitFacts) -> str:
    """Beside an archived model: its predictions on one split's test images."""
    return f"predictions-{split.split_hash[:16]}.json"


def seen_among(layout: Layout, production: Production, hashes: Collection[str]) -> set[str]:
    """Those of these images (content hashes) that `production` trained or was selected on."""
    seen_file = archive_file(layout, production.archive, SEEN_FILE)
    seen = set(read_json(seen_file) if seen_file.is_file() else [])
    return seen.intersection(hashes)


# Beside an archived model: its prediction on each test image any split has asked about, by the
# image's content hash (the candidate's own at promotion, then those the gate computed).
PREDICTIONS_BY_IMAGE = "image-predictions.json"


def production_predictions(
    layout: Layout, production: Production, split: SplitFacts
) -> tuple[list[int], int]:
    """`production`'s predictions on this split's test images, and how many of them this call
    computed. Each image is predicted once per production model, by its content, and kept
    beside its archive: a split that grew costs its new test images only (scoring every test
    image again took 14 s of an incremental run of model4 at 40,000 images)."""
    kept = archive_file(layout, production.archive, predictions_file(split))
    if kept.is_file():
        return list(read_json(kept)), 0
    by_image_file = archive_file(layout, production.archive, PREDICTIONS_BY_IMAGE)
    by_image: dict[str, int] = read_json(by_image_file) if by_image_file.is_file() else {}
    missing = [row for row, digest in enumerate(split.test_hashes) if digest not in by_image]
    if missing:
        import numpy as np

        from catdog.evaluation import load_model, predict_logits

        model = load_model(archive_path(layout, production))
        images = split.test_images(int(model.input_shape[1]))
        logits = predict_logits(model, RowsAt(images, missing))
        for row, predicted in zip(missing, np.argmax(logits, axis=1), strict=True):
            by_image[split.test_hashes[row]] = int(predicted)
        atomic_write_json(by_image_file, by_image, compact=True)
    predictions = [int(by_image[digest]) for digest in split.test_hashes]
    atomic_write_json(kept, predictions)
    return predictions, len(missing)


def install(
    layout: Layout,
    number: int,
    candidate: Candidate,
    split: SplitFacts,
    run: RunIdentity,
    exports: str | None,
    reference: Mapping[str, Path] | None = None,
    label: str | None = None,
) -> Production:
    """Archive the candidate's file and facts under production/models, as the next production
    (the `number`th decision), named `<number>-<label>` (by default the model's name);
    `exports` is its archived export folder, if any."""
    extras: dict[str, Path | Sequence[str] | Sequence[int] | Mapping[str, int]] = {
        SEEN_FILE: sorted(split.seen_hashes),
        predictions_file(split): list(candidate.predictions),
        PREDICTIONS_BY_IMAGE: dict(zip(split.test_hashes, candidate.predictions, strict=True)),
        **{name: Path(path) for name, path in (reference or {}).items()},
    }
    relative = archive(layout, number, label or candidate.name, Path(candidate.path), extras)
    return Production(
        model=candidate.name,
        epoch=candidate.epoch,
        archive=relative,
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
