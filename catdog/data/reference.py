"""What a promoted model keeps of the data it trained on, and a later run's data compared with
it (no Prefect import).

The profile stage writes `REFERENCE_FILE` (the training split's image properties and class
counts) and the suspects stage `FEATURES_SAMPLE_FILE` (a sample of the training images'
frozen-base features); the promotion keeps both beside the model it promotes, and the next
runs' data checks compare their own with production's (`compare_with_production`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from catdog.data import quality
from catdog.data.records import Manifest

REFERENCE_FILE = "reference.npz"
FEATURES_SAMPLE_FILE = "features_sample.npz"


@dataclass(frozen=True)
class ReferenceFiles:
    """One run's reference: its `REFERENCE_FILE` and, if it had cached features, its
    `FEATURES_SAMPLE_FILE`."""

    properties: Path
    features: Path | None = None


@dataclass(frozen=True)
class Comparison:
    """The checks that ran, in order, and why the others did not ("" when all ran)."""

    checks: list[quality.DataCheck] = field(default_factory=list)
    note: str = ""

    @property
    def failed(self) -> list[quality.DataCheck]:
        return [check for check in self.checks if not check.passed]


def write_reference(folder: Path, inspection: quality.Inspection, manifest: Manifest) -> Path:
    """Write `REFERENCE_FILE` into `folder`: the properties of the training split's images
    (in the split's order), the classes and the training images per class."""
    train = manifest.in_split("train")
    path = folder / REFERENCE_FILE
    with path.open("wb") as handle:
        np.savez(
            handle,
            properties=inspection.rows(entry.path for entry in train),
            classes=np.array(manifest.classes, dtype=str),
            counts=np.array([sum(e.class_name == c for e in train) for c in manifest.classes]),
        )
    return path


def write_features_sample(folder: Path, features: np.ndarray, about: str, seed: int) -> Path:
    """Write `FEATURES_SAMPLE_FILE` into `folder`: at most `quality.EMBEDDING_SAMPLE` rows of
    `features` drawn for `seed`, and `about`, what computed them (only features of the same
    origin are compared)."""
    sample = quality.sample_rows(features, quality.EMBEDDING_SAMPLE, seed)
    path = folder / FEATURES_SAMPLE_FILE
    with path.open("wb") as handle:
        np.savez(handle, rows=sample.astype(np.float32), about=np.array(about))
    return path


def _class_counts(reference: np.lib.npyio.NpzFile) -> dict[str, int]:
    return {str(c): int(n) for c, n in zip(reference["classes"], reference["counts"], strict=True)}


def compare_with_production(
    production: ReferenceFiles, current: ReferenceFiles, *, seed: int
) -> Comparison:
    """This run's training data against the data that trained production: the class balance
    and every image property always; the feature embeddings when both runs kept features,
    computed the same way.

    Args:
        production: The reference kept with the production model.
        current: This run's.
        seed: Draws the embedding check's samples and permutations.
    """
    with np.load(production.properties) as kept, np.load(current.properties) as now:
        checks = [quality.class_balance(_class_counts(kept), _class_counts(now))]
        checks += [
            quality.property_drift(name, kept["properties"][:, k], now["properties"][:, k])
            for k, name in enumerate(quality.PROPERTIES)
        ]
    if current.features is None:
        return Comparison(
            checks, "no cached features in this run: the embeddings were not compared"
        )
    if production.features is None:
        return Comparison(
            checks, "production's reference has no features: the embeddings were not compared"
        )
    with np.load(production.features) as kept, np.load(current.features) as now:
        if str(kept["about"]) != str(now["about"]):
            return Comparison(
                checks,
                f"production's features ({kept['about']}) and this run's ({now['about']}) "
                "differ: the embeddings were not compared",
            )
        checks.append(quality.embedding_drift(kept["rows"], now["rows"], seed=seed))
    return Comparison(checks)
