"""The pipeline's stages, in order: one table that everything reads (no Prefect import).

The artifacts layout (`catdog.layout`), the cache policy and the tasks (`tasks/`), the flow's
submission, retries and run labels (`flows/pipeline.py`), the summary's stage seconds, `cache
prune` and `--refresh` all read this table; nothing else spells out which stages exist. Adding a
stage is an entry here (in pipeline order) with its record type, a task declared with
`@stage_task(name)` in any module of `tasks/` (the flow finds it by the name given here), and the
flow's line that submits it (`tests/test_stage_table.py` does just that in a copy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from catdog.stage_records import (
    ArchiveRecord,
    ArraysRecord,
    CountsRecord,
    DataChecksRecord,
    EvaluationRecord,
    FeaturesRecord,
    FiguresRecord,
    ImagesRecord,
    InspectionRecord,
    ManifestRecord,
    ProfileRecord,
    PromotionRecord,
    Record,
    ReportRecord,
    SplitRecord,
    SuspectsRecord,
    TrainedRecord,
)

# The library modules a model's stages run: their source keys features, training and promotion.
TRAIN_CODE = (
    "catdog.training",
    "catdog.models",
    "catdog.layers",
    "catdog.features",
    "catdog.arrays",
)


@dataclass(frozen=True)
class Stage:
    name: str  # what --refresh takes and record.json says, e.g. "decode"
    task: str  # its Prefect task's name, e.g. "decode_images"
    folder: str  # where its outputs go, under the artifacts root
    code: tuple[str, ...]  # the library modules whose source is part of its cache key
    record: type[Record | PromotionRecord | ReportRecord | DataChecksRecord]  # what it returns
    label: str = ""  # its task run's name, formatted with the task's inputs; default `task`
    per_model: bool = False  # one folder per model: <folder>/<model>/<key>
    retries: str | None = None  # the flow parameter that sets its retries, if any
    gpu: bool = False  # goes to a worker with a GPU when the cluster has such workers
    cached: bool = True  # False: runs every time (it reads state outside its inputs)

    def label_for(self, inputs: Mapping[str, object]) -> str:
        """This stage's task run name for these inputs, e.g. "train_model[model1]"."""
        return (self.label or self.task).format(**inputs)


STAGES: tuple[Stage, ...] = (
    Stage(
        "download",
        "download_dataset",
        "01_raw",
        ("catdog.data.download",),
        ArchiveRecord,
        retries="download_retries",
    ),
    Stage("extract", "extract_dataset", "02_images", ("catdog.data.extract",), ImagesRecord),
    Stage(
        "manifest",
        "build_manifest",
        "03_splits/manifests",
        ("catdog.data.manifest",),
        ManifestRecord,
    ),
    Stage(
        "inspect",
        "inspect_images",
        "03_splits/inspections",
        ("catdog.data.quality",),
        InspectionRecord,
    ),
    Stage("split", "split_dataset", "03_splits/splits", ("catdog.data.split",), SplitRecord),
    Stage("count", "count_labels", "03_splits/counts", ("catdog.data.counts",), CountsRecord),
    Stage(
        "profile",
        "profile_data",
        "03_splits/profiles",
        (
            "catdog.data.quality",
            "catdog.data.profile",
            "catdog.data.reference",
            "catdog.data.figures",
            "catdog.plots",
        ),
        ProfileRecord,
    ),
    Stage(
        "plot",
        "plot_samples",
        "03_splits/figures",
        ("catdog.plots", "catdog.data.samples", "catdog.layers"),
        FiguresRecord,
    ),
    Stage(
        "decode",
        "decode_images",
        "03_splits/arrays",
        ("catdog.data.images", "catdog.arrays"),
        ArraysRecord,
        label="decode_images[{image_size}]",
    ),
    Stage(
        "features",
        "extract_features",
        "03_splits/features",
        TRAIN_CODE,
        FeaturesRecord,
        label="extract_features[{model}]",
        gpu=True,
    ),
    Stage(
        "suspects",
        "find_suspect_labels",
        "03_splits/suspects",
        (
            "catdog.data.quality",
            "catdog.data.probe",
            "catdog.data.suspects",
            "catdog.data.reference",
            "catdog.data.figures",
            "catdog.features",  # the training features it probes, as that module reads them
            "catdog.plots",
        ),
        SuspectsRecord,
    ),
    # Compares with production's reference, which changes between runs: never cached.
    Stage(
        "check",
        "check_data",
        "production",
        ("catdog.data.quality", "catdog.data.reference"),
        DataChecksRecord,
        cached=False,
    ),
    Stage(
        "train",
        "train_model",
        "04_models",
        TRAIN_CODE,
        TrainedRecord,
        label="train_model[{model}]",
        per_model=True,
        retries="train_retries",
        gpu=True,
    ),
    Stage(
        "evaluate",
        "evaluate_model",
        "04_evaluations",
        # A frozen-base model is scored on its base's features, computed as for training.
        ("catdog.evaluation", "catdog.plots", "catdog.features", "catdog.models", "catdog.layers"),
        EvaluationRecord,
        label="evaluate_model[{model}]",
        per_model=True,
        gpu=True,
    ),
    # Reads and writes production/ under a lock: never cached, never retried.
    # What the gate would decide, to ask a person before `promote` (--approve-promotion).
    Stage(
        "propose",
        "propose_promotion",
        "production",
        ("catdog.gate",),
        PromotionRecord,
        cached=False,
    ),
    Stage(
        "promote",
        "promote_model",
        "production",
        ("catdog.gate",),
        PromotionRecord,
        cached=False,
    ),
    Stage(
        "report",
        "write_report",
        "05_reports",
        ("catdog.summary", "catdog.report"),
        ReportRecord,
        cached=False,
    ),
)

BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
BY_TASK: dict[str, Stage] = {stage.task: stage for stage in STAGES}
STAGE_NAMES: tuple[str, ...] = tuple(BY_NAME)
CACHED_STAGES: tuple[str, ...] = tuple(stage.name for stage in STAGES if stage.cached)


def stage(name: str) -> Stage:
    """The stage called `name` (KeyError names the stages that exist)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no stage {name!r}; stages: {', '.join(BY_NAME)}") from None


def stage_of_task(task: str) -> Stage:
    """The stage whose task is called `task` (e.g. "decode_images")."""
    return BY_TASK[task]


def refreshed(name: str, refresh: str | None) -> bool:
    """Whether `--refresh refresh` makes stage `name` ignore its cache: "all" refreshes every
    stage, a stage's name refreshes it and every later one."""
    if refresh is None:
        return False
    if refresh == "all":
        return True
    return STAGE_NAMES.index(name) >= STAGE_NAMES.index(refresh)
