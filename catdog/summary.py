"""A run's record: summary.json and report.md, from the stages' typed records.

`RunSummary` is summary.json as typed objects: built here from the stages' records, rendered by
`catdog.report`, written with `to_json` and read back with `from_json`. The promotion decision
comes in as a record of its own (`catdog.gate` makes it, before the report).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

from catdog import catalog
from catdog.data.figures import NEAR_DUPLICATES_FIGURE, PROFILE_FIGURE, SUSPECTS_FIGURE
from catdog.data.samples import AUGMENTATION_FIGURE, SAMPLES_FIGURE
from catdog.hashing import sha256_json
from catdog.io import JsonObject, atomic_write_json, atomic_write_text, read_json
from catdog.layout import (
    MANIFEST_FILE,
    MODEL_FILE,
    RECORD_FILE,
    REPORT_FILE,
    STAGE_DIRS,
    SUMMARY_FILE,
    Layout,
    size_on_disk,
)
from catdog.report import render_report
from catdog.stage_records import (
    ArraysRecord,
    CountsRecord,
    DataChecksRecord,
    EvaluationRecord,
    FeaturesRecord,
    FiguresRecord,
    InspectionRecord,
    ManifestRecord,
    ProfileRecord,
    PromotionRecord,
    SplitRecord,
    SuspectsRecord,
    TrainedRecord,
)


@dataclass(frozen=True)
class RunRecords:
    """What the pipeline's stages returned for one run, by stage and model."""

    manifest: ManifestRecord
    split: SplitRecord
    counts: CountsRecord
    figures: FiguresRecord
    arrays: dict[str, ArraysRecord]  # per model: the decoded images it trained on
    features: dict[str, FeaturesRecord]  # per model trained on cached features
    trained: dict[str, TrainedRecord]
    evaluated: dict[str, EvaluationRecord]
    inspection: InspectionRecord
    profile: ProfileRecord
    suspects: SuspectsRecord | None  # None when no model of the run has cached features
    checks: DataChecksRecord


@dataclass(frozen=True)
class RunInfo:
    """What a run was asked to do, and where its data came from."""

    data: str
    models: list[str]  # the models trained, those they start from included
    epochs: int
    seed: int
    weights: str | None  # the weights file the frozen-base models loaded
    image_size: int
    transfer_image_size: int  # the frozen-base models' input side (if any of them runs)
    # False: the dataset URL could not be asked (or --offline); the last good download was used.
    source_fresh: bool = True
    source_warning: str | None = None
    # --warm-start production: the models that start cold, and why (production is another)
    cold_starts: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskOutcome:
    """How one task run of this run ended."""

    state: str  # "Completed", "Cached", ...
    seconds: float | None = None  # what its stage took when it computed its output
    dir: str | None = None  # its output folder, relative to the artifacts root


# ----------------------------------------------------------------------------- summary.json


@dataclass(frozen=True)
class RunFacts:
    """summary.json's "run": what it was asked to do (`RunInfo`), which run, where its report is."""

    data: str
    models: list[str]
    epochs: int
    seed: int
    weights: str | None
    image_size: int
    transfer_image_size: int | None  # None: no frozen-base model ran
    source_fresh: bool
    source_warning: str | None
    id: str  # the Prefect flow run's id ("local" outside one)
    name: str
    finished_at: str  # ISO 8601, UTC, to the second
    report: str  # this run's report.md
    comparison_figure: str | None = None  # every model's curves; None (left out): no model
    cold_starts: dict[str, str] = field(default_factory=dict)  # as RunInfo's

    def to_json(self) -> JsonObject:
        facts = asdict(self)
        if self.comparison_figure is None:
            del facts["comparison_figure"]
        return facts


@dataclass(frozen=True)
class DataSummary:
    """summary.json's "data": the dataset, its split and the majority-class baseline."""

    classes: list[str]
    layout: str
    images: int
    skipped: int
    skipped_files: list[dict[str, str]]  # {"path", "reason"}
    counts: dict[str, dict[str, int]]  # [split][class]
    baseline: dict[str, float]  # majority-class accuracy per split
    baseline_accuracy: float  # on the test split
    majority_class: str
    manifest_hash: str
    split_hash: str
    source_fresh: bool
    source_warning: str | None


@dataclass(frozen=True)
class ModelSummary:
    """One model's entry in summary.json: its training, its test scores, where it lies."""

    image_size: int
    epochs: int
    history: dict[str, list[float]]
    epoch_seconds: list[float]
    best_epoch: int  # 1-based: the epoch its file holds
    saved_from: str  # whose weights that epoch's file holds
    # Its training, with the stages it needs (its images' decode, the base's features); a
    # stage two models share counts for each of them.
    train_seconds: float
    trainable_params: int
    total_params: int
    path: str  # its model.keras
    worker: dict[str, str | int]  # {"host", "pid"} that trained it
    test_accuracy: float
    test_loss: float
    confusion_matrix: list[list[int]]
    per_class: dict[str, dict[str, float]]  # precision, recall, f1, support per class
    macro_f1: float
    evaluation_dir: str
    warm_start: str | None = None  # what its training started from, when a warm start was asked


@dataclass(frozen=True)
class RunSummary:
    """summary.json, field by field: the run, its data and data checks, every model's scores,
    the best model and the gate's decision, how each task ended and what the run used."""

    run: RunFacts
    data: DataSummary
    data_checks: list[dict[str, str | bool | float]]  # DataCheck.to_json() each
    data_checks_reference: str | None  # the production archive compared with
    data_checks_note: str  # why a check did not run
    on_data_issue: str
    near_duplicates: dict[str, int]  # groups, images, across_splits
    near_duplicate_groups: list[list[dict[str, str]]]  # [{"path", "split"}], those shown
    suspect_labels: list[dict[str, str | float]]  # {"path", "label", "probability"}
    suspects_from: str | None  # what computed the features; None: no suspects stage ran
    models: dict[str, ModelSummary]
    best_model: str | None
    promotion: PromotionRecord | None
    tasks: dict[str, str]  # task run name -> final state
    artifacts_used: list[str]  # output folders, relative to the artifacts root
    disk_bytes: dict[str, int]  # by stage, and "total"
    stage_seconds: dict[str, float]  # by task run name, for the tasks that computed
    # What this run's data changed since the last run's, and what each per-image stage
    # computed and reused (see `increment`).
    increment: JsonObject = field(default_factory=dict)

    def to_json(self) -> JsonObject:
        facts = {f.name: getattr(self, f.name) for f in fields(self)}
        return {
            **facts,
            "run": self.run.to_json(),
            "data": asdict(self.data),
            "models": {name: asdict(model) for name, model in self.models.items()},
            "promotion": self.promotion.to_json() if self.promotion else None,
        }

    @classmethod
    def from_json(cls, facts: JsonObject) -> RunSummary:
        promotion = facts["promotion"]
        return cls(
            **{
                **facts,
                "run": RunFacts(**facts["run"]),
                "data": DataSummary(**facts["data"]),
                "models": {name: ModelSummary(**m) for name, m in facts["models"].items()},
                "promotion": PromotionRecord.from_json(promotion) if promotion else None,
            }
        )


# ----------------------------------------------------------------------------- building it


def features_for(name: str, records: RunRecords) -> FeaturesRecord | None:
    """The cached features model `name` trained on, or its starting model did."""
    entry = catalog.spec(name)
    while name not in records.features and entry.starts_from:
        name, entry = entry.starts_from, catalog.spec(entry.starts_from)
    return records.features.get(name)


def model_summary(layout: Layout, name: str, records: RunRecords) -> ModelSummary:
    """One model's entry in summary.json: its training, its test scores, where it lies."""
    trained, evaluated = records.trained[name], records.evaluated[name]
    arrays = records.arrays[name]
    features = features_for(name, records)
    extra = arrays.seconds + (features.seconds if features else 0.0)
    return ModelSummary(
        image_size=arrays.image_size,
        epochs=trained.epochs,
        history=trained.history,
        epoch_seconds=trained.epoch_seconds,
        best_epoch=trained.best_epoch,
        saved_from=trained.saved_from,
        train_seconds=trained.seconds + extra,
        trainable_params=trained.trainable_params,
        total_params=trained.total_params,
        path=str(layout.resolve(trained.dir) / MODEL_FILE),
        worker=trained.worker,
        test_accuracy=evaluated.accuracy,
        test_loss=evaluated.loss,
        confusion_matrix=evaluated.confusion_matrix,
        per_class=evaluated.per_class,
        macro_f1=evaluated.macro_f1,
        evaluation_dir=str(layout.resolve(evaluated.dir)),
        warm_start=trained.warm_start,
    )


def data_summary(run: RunInfo, records: RunRecords) -> DataSummary:
    manifest, split, counts = records.manifest, records.split, records.counts
    return DataSummary(
        classes=split.classes,
        layout=manifest.layout,
        images=manifest.images,
        skipped=manifest.skipped,
        skipped_files=split.skipped,
        counts=counts.counts,
        baseline=counts.baseline,
        baseline_accuracy=counts.baseline["test"],
        majority_class=counts.majority_class,
        manifest_hash=manifest.manifest_hash,
        split_hash=split.split_hash,
        source_fresh=run.source_fresh,
        source_warning=run.source_warning,
    )


def previous_manifest(layout: Layout) -> tuple[str | None, Path | None]:
    """The last finished run's name and manifest file, from its summary (None: no run yet,
    or its manifest was pruned)."""
    runs = sorted(layout.runs_dir.glob(f"*/{SUMMARY_FILE}")) if layout.runs_dir.is_dir() else []
    if not runs:
        return None, None
    try:
        last = read_json(runs[-1])  # run folders are named by their UTC time: the newest last
    except (OSError, ValueError):
        return None, None
    name = str(last.get("run", {}).get("name"))
    folder = STAGE_DIRS["manifest"] + "/"
    for used in last.get("artifacts_used", []):
        if str(used).startswith(folder):
            path = layout.resolve(str(used)) / MANIFEST_FILE
            return name, path if path.is_file() else None
    return name, None


def increment(
    layout: Layout,
    records: RunRecords,
    tasks: dict[str, TaskOutcome],
    previous: tuple[str | None, Path | None],
) -> JsonObject:
    """What the data changed since the last run ("images": new, changed, moved, removed; None
    when there is no last run to compare with) and, per per-image stage, the images it
    computed and those it found already done (a cached stage computed none)."""
    from catdog.data.manifest import changes
    from catdog.data.records import Manifest

    since, path = previous
    images = None
    if path is not None:
        current = Manifest.load(layout.resolve(records.manifest.dir) / MANIFEST_FILE)
        images = changes(Manifest.load(path), current)
    stages: dict[str, JsonObject] = {}
    per_image = [records.manifest, records.inspection]
    per_image += [*records.arrays.values(), *records.features.values()]
    per_image += [*records.evaluated.values(), *([records.suspects] if records.suspects else [])]
    by_dir = {outcome.dir: (label, outcome.state) for label, outcome in tasks.items()}
    for record in per_image:
        label, state = by_dir.get(record.dir, (None, None))
        if label is None or not record.per_image:
            continue
        total = sum(record.per_image.values())
        done = record.per_image if state != "Cached" else {"computed": 0, "reused": total}
        stages[label] = {"state": state, **done}
    return {"since": since, "images": images, "stages": stages}


def run_facts(
    run: RunInfo, run_id: str, name: str, finished: datetime, report: Path, comparison: Path | None
) -> RunFacts:
    transfer = any(catalog.spec(m).input_size == "transfer_image_size" for m in run.models)
    return RunFacts(
        **{**asdict(run), "transfer_image_size": run.transfer_image_size if transfer else None},
        id=run_id,
        name=name,
        finished_at=finished.isoformat(timespec="seconds"),
        report=str(report),
        comparison_figure=str(comparison) if comparison else None,
    )


def disk_bytes(layout: Layout, folders: list[str]) -> dict[str, int]:
    """Bytes on disk of the run's stage outputs, by stage (from each folder's record), and in
    all; `python -m catdog cache prune` frees them once no recent run uses them."""
    by_stage: dict[str, int] = {}
    for folder in sorted(set(folders)):
        found = _output_size(layout, folder)
        if found is not None:
            stage, size = found
            by_stage[stage] = by_stage.get(stage, 0) + size
    return {**by_stage, "total": sum(by_stage.values())}


def _output_size(layout: Layout, folder: str) -> tuple[str, int] | None:
    """A stage output's stage and bytes: on this host, or in the store when this host never
    fetched it (a cluster's report is written where its last task ran); None if neither."""
    path = layout.resolve(folder)
    if path.is_dir():
        try:
            stage = read_json(path / RECORD_FILE).get("stage", "other")
        except (OSError, ValueError):
            stage = "other"
        return str(stage), size_on_disk(path)
    if layout.store is None:
        return None
    objects = layout.store.listing(folder)
    if not objects:
        return None
    record = layout.store.read_json(f"{folder}/{RECORD_FILE}")
    stage = record[0].get("stage", "other") if record and isinstance(record[0], dict) else "other"
    return str(stage), sum(item.size for item in objects.values())


def figure_paths(
    layout: Layout, records: RunRecords, models: dict[str, ModelSummary]
) -> dict[str, Path]:
    """Every figure of the run that exists, by report reference ("samples", "model1:curves")."""
    from catdog.plots import EVALUATION_FIGURES  # matplotlib: only when a report is written

    figures_dir = layout.resolve(records.figures.dir)
    paths = {
        "samples": figures_dir / SAMPLES_FIGURE,
        "augmentation": figures_dir / AUGMENTATION_FIGURE,
    }
    profile_dir = layout.resolve(records.profile.dir)
    paths["profile"] = profile_dir / PROFILE_FIGURE
    paths["near_duplicates"] = profile_dir / NEAR_DUPLICATES_FIGURE
    if records.suspects:
        paths["suspects"] = layout.resolve(records.suspects.dir) / SUSPECTS_FIGURE
    paths = {kind: path for kind, path in paths.items() if path.is_file()}
    for name, model in models.items():
        for kind, file_name in EVALUATION_FIGURES.items():
            path = Path(model.evaluation_dir) / file_name
            if path.is_file():
                paths[f"{name}:{kind}"] = path
    return paths


def comparison_figure(
    layout: Layout, models: dict[str, ModelSummary], baseline: dict[str, float]
) -> Path:
    """All models' validation curves on one figure, drawn once per distinct set of histories."""
    histories = {name: model.history for name, model in models.items()}
    # A keyed folder of the report stage, so `cache prune` treats it like any stage output.
    folder = layout.output_dir("report", f"report-{sha256_json(histories)[:32]}")
    path = folder / "comparison.png"
    if not path.is_file():
        from catdog.plots import compare_models, save_figure

        save_figure(compare_models(histories, baseline["validation"]), path)
    return path


def write_run(
    layout: Layout,
    run: RunInfo,
    records: RunRecords,
    *,
    run_id: str,
    run_name: str,
    tasks: dict[str, TaskOutcome],
    promotion: PromotionRecord | None,
) -> tuple[RunSummary, str]:
    """Write the run's summary.json and report.md (in its own run folder, and summary.json at
    the root).

    Args:
        layout: The artifacts folder.
        run: What the run was asked to do.
        records: The stages' records.
        run_id: The run's id; its end names the run folder.
        run_name: The run's name, for people.
        tasks: How every task run of the run ended, by task run name.
        promotion: The promotion gate's decision on the run's best model.

    Returns:
        (summary, report Markdown).
    """
    finished = datetime.now(UTC)
    previous = previous_manifest(layout)  # before this run's own summary is written
    # The id's end: Prefect's ids (UUIDv7) begin with the time, so two runs of one second
    # would share their first characters.
    run_dir = layout.runs_dir / f"{finished.strftime('%Y%m%dT%H%M%SZ')}-{run_id[-12:]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    models = {name: model_summary(layout, name, records) for name in records.trained}
    figures = figure_paths(layout, records, models)
    used = [outcome.dir for outcome in tasks.values() if outcome.dir]
    artifacts_used = sorted(set(used))
    comparison = None
    if models:
        comparison = comparison_figure(layout, models, records.counts.baseline)
        figures["comparison"] = comparison
        artifacts_used.append(layout.relative(comparison.parent))
    checks, suspects = records.checks, records.suspects
    summary = RunSummary(
        run=run_facts(run, run_id, run_name, finished, run_dir / REPORT_FILE, comparison),
        data=data_summary(run, records),
        data_checks=checks.checks,
        data_checks_reference=checks.reference,
        data_checks_note=checks.note,
        on_data_issue=checks.policy,
        near_duplicates=records.profile.near_duplicates,
        near_duplicate_groups=records.profile.groups,
        suspect_labels=suspects.suspects if suspects else [],
        suspects_from=suspects.features if suspects else None,
        models=models,
        best_model=promotion.candidate if promotion else None,
        promotion=promotion,
        tasks={label: outcome.state for label, outcome in tasks.items()},
        artifacts_used=artifacts_used,
        disk_bytes=disk_bytes(layout, used),
        stage_seconds={
            label: outcome.seconds for label, outcome in tasks.items() if outcome.seconds
        },
        increment=increment(layout, records, tasks, previous),
    )
    report = render_report(summary, {k: os.path.relpath(v, run_dir) for k, v in figures.items()})
    atomic_write_text(run_dir / REPORT_FILE, report)
    atomic_write_json(run_dir / SUMMARY_FILE, summary.to_json())
    atomic_write_json(layout.summary, summary.to_json())
    return summary, report
