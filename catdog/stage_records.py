"""What each stage returns: a small typed record naming its output folder and a few facts.

Records cross the layers (library, tasks, flow, report) and the wire (Dask, Prefect's JSON
results), so they hold plain JSON values only, never arrays or TensorFlow objects: a folder
relative to the artifacts root, the cache key that names it, the hash of every file in it,
and what a later stage or the report needs to know without opening the files. (The manifest's
own records, one per image, are `catdog.data.records`.)

A cached stage's record comes back from Prefect's JSON results through pydantic, by its class's
qualified name: its fields keep types pydantic can rebuild (no TypedDict before Python 3.12).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from catdog.export import ExportCheck
from catdog.io import JsonObject


@dataclass(frozen=True)
class Record:
    """What every stage output has."""

    key: str  # the cache key, also the output folder's name
    dir: str  # the output folder, relative to the artifacts root
    files: dict[str, str] = field(default_factory=dict)  # file (relative) -> sha256
    seconds: float = 0.0  # time its stage took to compute it (a cached record keeps it)

    def identity(self) -> Any:
        """What this record contributes to a later stage's cache key: what it is, not how
        long it took or how much of it earlier runs had already done."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in HOW_IT_WAS_MADE}


# Facts about how an output was made, not what it is: a stage whose per-image pieces were all
# found computes the same output as one that computed them all.
HOW_IT_WAS_MADE = (
    "seconds",
    "per_image",
    "files_read",
    "pieces",
    "piece_files",
    "near_duplicates_compared",
    "cross_validated",
    "objects_fetched",
)


@dataclass(frozen=True)
class ArchiveRecord(Record):
    """The dataset as downloaded: `archive.zip` in its folder, or a folder used in place."""

    kind: str = "zip"  # "url", "zip", "folder" or "store" (a folder in an object store)
    content: str = ""  # "sha256:<hash>" of the archive, or a folder's listing fingerprint
    root: str | None = None  # a folder source's absolute path, or a store folder's URL
    source: str = ""  # where it came from, as given (for messages; not part of its identity)

    def identity(self) -> Any:
        # The same bytes, however they were fetched, are one dataset: two URLs (or a URL and
        # a local copy) that serve the same archive share every later stage.
        return {"content": self.content}


@dataclass(frozen=True)
class ImagesRecord(Record):
    root: str = ""  # the extracted images, relative to the artifacts root, or a folder source


@dataclass(frozen=True)
class ManifestRecord(Record):
    root: str = ""  # the folder the manifest's image paths are relative to
    layout: str = ""  # "train_validation", "train_validation_test" or "single_root"
    classes: list[str] = field(default_factory=list)
    images: int = 0  # usable images
    skipped: int = 0  # files left out, with their reasons in the manifest
    manifest_hash: str = ""
    # {"computed", "reused"}: images validated now, and those whose content's verdict was known
    per_image: dict[str, int] = field(default_factory=dict)
    files_read: int = 0  # files read: new, or changed since a run last looked
    pieces: list[str] = field(default_factory=list)  # the per-image pieces it used (folders)
    # A folder in an object store: the objects this host fetched into its mirror for it.
    objects_fetched: int | None = None


@dataclass(frozen=True)
class InspectionRecord(Record):
    """`inspection.npz` (every image's properties and hashes) and `near_duplicates.json`."""

    images: int = 0
    near_duplicate_groups: int = 0
    near_duplicate_images: int = 0
    max_bits: int = 0  # the Hamming distance (of 64 bits) that links two images
    per_image: dict[str, int] = field(default_factory=dict)  # {"computed", "reused"}
    near_duplicates_compared: int = 0  # images compared with all the others (the new ones)
    pieces: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SplitRecord(Record):
    root: str = ""
    classes: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # images per split
    split_hash: str = ""  # names the split for everything downstream
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}


@dataclass(frozen=True)
class CountsRecord(Record):
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # [split][class]
    baseline: dict[str, float] = field(default_factory=dict)  # majority-class accuracy per split
    majority_class: str = ""
    imbalance_warning: str | None = None


@dataclass(frozen=True)
class ProfileRecord(Record):
    """`profile.json` (per split and class), `reference.npz` (the training split's properties
    and class counts, kept with a promoted model), and figures."""

    near_duplicates: dict[str, int] = field(default_factory=dict)  # groups, images, across_splits
    groups: list[list[dict[str, str]]] = field(default_factory=list)  # [{"path", "split"}], shown


@dataclass(frozen=True)
class SuspectsRecord(Record):
    """`features_sample.npz` (training features kept with a promoted model) and
    `suspects.png`."""

    # {"path", "label", "probability"}, lowest probability first
    suspects: list[dict[str, str | float]] = field(default_factory=list)
    features: str = ""  # what computed the features: model, image size, weights
    # {"computed", "reused"}: images scored now, and those whose probabilities were kept
    per_image: dict[str, int] = field(default_factory=dict)
    cross_validated: bool = True  # every fold fitted now, not an earlier run's probe
    pieces: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FiguresRecord(Record):
    """`samples.png` and `augmentation.png`."""


@dataclass(frozen=True)
class ArraysRecord(Record):
    image_size: int = 0  # the decoded images' square side
    classes: list[str] = field(default_factory=list)
    per_image: dict[str, int] = field(default_factory=dict)  # {"computed", "reused"}
    pieces: list[str] = field(default_factory=list)
    # The pixel packs its splits read their rows from (relative path -> SHA-256): part of the
    # output, checked with its files, but not of what it is (the same images in other packs).
    piece_files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FeaturesRecord(Record):
    model: str = ""  # the frozen-base model whose base computed them
    views: int = 1  # cached views per training image
    dim: int = 0  # length of a feature vector
    per_image: dict[str, int] = field(default_factory=dict)  # {"computed", "reused"}, all views
    pieces: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TrainedRecord(Record):
    model: str = ""
    epochs: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)  # Keras-style, per epoch
    epoch_seconds: list[float] = field(default_factory=list)
    best_epoch: int = 0  # 1-based; the epoch `model.keras` holds
    saved_from: str = ""  # whose weights that epoch's file holds (fine-tuning may ship its start)
    replicas: int = 1  # devices one batch was split over
    trainable_params: int = 0
    total_params: int = 0
    worker: dict[str, str | int] = field(default_factory=dict)  # {"host", "pid"} that trained it
    # The settings that key it (catdog.config.TrainConfig's fields)
    settings: dict[str, int | float | str] = field(default_factory=dict)
    seed: int = 0
    weights: str | None = None
    inputs: dict[str, str | None] = field(default_factory=dict)  # keys of what it read
    warm_start: str | None = None  # what it started from, when a warm start was asked for
    # The model it started from (`catdog.warm.WarmStart`): its file, content hash and name
    warm_file: str | None = None
    warm_sha256: str | None = None
    warm_about: str | None = None

    def identity(self) -> Any:
        # Its files say what it is; how long each epoch took and where it ran do not.
        facts = super().identity()
        return {k: v for k, v in facts.items() if k not in ("epoch_seconds", "worker")}


@dataclass(frozen=True)
class EvaluationRecord(Record):
    model: str = ""
    accuracy: float = 0.0  # on the test split
    loss: float = 0.0
    macro_f1: float = 0.0
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion_matrix: list[list[int]] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list)  # class per test image, split order
    # A frozen-base model is scored on its base's cached features of the test images:
    # {"computed", "reused"} test images, and the feature pieces it read and added to.
    per_image: dict[str, int] = field(default_factory=dict)
    pieces: list[str] = field(default_factory=list)
    # How its base was known to compute the cached features: "weights" (those of the base that
    # computed them) or "features" (its features of a few validation images matched).
    base_check: str = ""


@dataclass(frozen=True)
class DataChecksRecord:
    """This run's data against the data that trained production (no folder of its own)."""

    # DataCheck.to_json(): {"name", "passed", "statistic", "threshold", "detail"}
    checks: list[dict[str, str | bool | float]] = field(default_factory=list)
    reference: str | None = None  # the production archive compared with; None: no reference
    note: str = ""  # why a check did not run
    policy: str = "warn"  # --on-data-issue

    @property
    def failed(self) -> list[dict[str, str | bool | float]]:
        return [check for check in self.checks if not check["passed"]]


# The promotion gate's record (catdog.gate) and its parts.


@dataclass(frozen=True)
class Policy:
    """What a candidate must meet to replace production (None: that rule is off)."""

    margin: float = 0.0  # test-accuracy gain over production, on the same test images
    min_accuracy: float | None = None  # the candidate's own test accuracy, at least
    min_class_recall: float | None = None  # every class's test recall, at least
    # McNemar p against production, at most: the gain must be more than chance on these images
    max_p_value: float | None = None


@dataclass(frozen=True)
class Evidence:
    """Candidate against production on the same test images."""

    candidate_accuracy: float
    production_accuracy: float
    disagreements: int  # images that exactly one of the two classifies correctly
    candidate_only: int  # right by the candidate only
    production_only: int  # right by production only
    p_value: float  # exact two-sided McNemar test on the disagreements
    # Test images whose production prediction this run computed; the others' were kept from
    # earlier runs, by the image's content (catdog.registry.production_predictions).
    production_computed: int = 0
    # This run's test images that production trained or was selected on: left out of the
    # comparison (a dataset that grew moves a few validation images into the test split).
    left_out: int = 0


@dataclass(frozen=True)
class Approval:
    """A person's answer to `--approve-promotion`; only "approved" lets a candidate through."""

    outcome: str  # "approved", "rejected", "timed out" or "not asked (...)"
    by: str  # who answered, "" if nobody did


@dataclass(frozen=True)
class PromotionRecord:
    """The promotion gate's decision (no folder of its own: it writes `production/`)."""

    promoted: bool
    reason: str
    candidate: str
    candidate_epoch: int
    margin: float
    rule: str  # which rule decided (catdog.gate.Decision)
    policy: Policy
    candidate_accuracy: float | None  # None: not compared with production
    production_accuracy: float | None
    evidence: Evidence | None
    export_check: ExportCheck | None  # None: no exports made
    approval: Approval | None  # None: no person was asked
    seconds: float = 0.0  # time the gate took (production's predictions, the export check)

    def to_json(self) -> JsonObject:
        """As summary.json, the events and (in part) the registry hold it."""
        return {
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
            "policy": asdict(self.policy),
            "evidence": asdict(self.evidence) if self.evidence else None,
            "export_check": self.export_check.to_json() if self.export_check else None,
            "approval": asdict(self.approval) if self.approval else None,
        }

    @classmethod
    def from_json(cls, facts: JsonObject) -> PromotionRecord:
        evidence, check, approval = facts["evidence"], facts["export_check"], facts["approval"]
        return cls(
            **{
                **facts,
                "policy": Policy(**facts["policy"]),
                "evidence": Evidence(**evidence) if evidence else None,
                "export_check": ExportCheck.from_json(check) if check else None,
                "approval": Approval(**approval) if approval else None,
            }
        )


@dataclass(frozen=True)
class ReportRecord:
    """Where the run's summary and report are."""

    summary: str
    report: str
    best_model: str | None = None
