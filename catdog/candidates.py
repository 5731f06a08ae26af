"""The run's candidate for production and its test split, as the promotion gate needs them.

The candidate is the model whose shipped epoch (the one its file holds) has the highest
validation accuracy; test accuracy is never consulted to choose it (see `catdog.gate`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from catdog.arrays import Rows
from catdog.data.records import Manifest
from catdog.layout import MODEL_FILE, Layout
from catdog.stage_records import (
    ArraysRecord,
    EvaluationRecord,
    ManifestRecord,
    SplitRecord,
    TrainedRecord,
)


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


class Trained(Protocol):
    """A trained model's record or summary entry: its history and the epoch its file holds."""

    @property
    def history(self) -> Mapping[str, Sequence[float]]: ...

    @property
    def best_epoch(self) -> int: ...  # 1-based; 0: the last epoch


def shipped_val_accuracy(model: Trained) -> float:
    """Validation accuracy of the epoch whose weights a model's file holds (its best epoch)."""
    history = model.history["val_accuracy"]
    return float(history[model.best_epoch - 1]) if model.best_epoch else history[-1]


def best_by_validation(models: Mapping[str, Trained]) -> str:
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
    best = best_by_validation(trained)
    model = trained[best]
    return Candidate(
        name=best,
        path=str(layout.resolve(model.dir) / MODEL_FILE),
        epoch=model.best_epoch,
        val_accuracy=shipped_val_accuracy(model),
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
