"""The catdog training pipeline as a Prefect flow: the recipe, stage by stage.

python flows/train_flow.py --data cats_and_dogs_filtered.zip --models model1 --epochs 2
python flows/train_flow.py serve --cron "0 3 * * 1"

The command line and `serve` are in flows/cli.py; how a stage is submitted and how a run ends
(the first failure, and stopping the rest) in flows/pipeline.py.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

if __name__ == "__main__":  # run as a script: the command line (before Prefect is imported)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flows.cli import main

    sys.exit(main())

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from catdog import catalog
from catdog.catalog import DEFAULT_MODELS
from catdog.checks import check_run_inputs
from catdog.config import DATA, OFFICIAL_DATA_URL, RUN, TRAIN
from catdog.data.freshness import check_source
from catdog.layout import Layout
from catdog.mirror import local_copy, pull_files, pull_production
from catdog.stage_records import Policy, ReportRecord
from catdog.summary import RunInfo, RunRecords
from catdog.warm import warm_starts
from flows.approval import ask_for_approval
from flows.console import quiet_tracebacks
from flows.parameters import (
    ApprovalTimeout,
    ApprovePromotion,
    Artifacts,
    BatchSize,
    Data,
    DownloadRetries,
    Epochs,
    Export,
    FeatureViews,
    FinetuneEpochs,
    ImageSize,
    KeepRuns,
    MaxImagesPerClass,
    MaxPValue,
    MinAccuracy,
    MinClassRecall,
    Models,
    Offline,
    OnDataIssue,
    Precision,
    PromoteMargin,
    Refresh,
    Seed,
    Sha256,
    Strategy,
    TrainRetries,
    TransferImageSize,
    WarmStartFrom,
    Weights,
)
from flows.pipeline import Pipeline
from flows.runners import sequential


def _run_name() -> str:
    params = flow_run.parameters
    models = "+".join(params.get("models") or DEFAULT_MODELS)
    data = Path(str(params.get("data", "data")).rstrip("/")).name
    return f"{models} on {data} (seed {params.get('seed')}) {datetime.now(UTC):%Y-%m-%d %H:%M}"


@flow(name="catdog-train", flow_run_name=_run_name, log_prints=True, task_runner=sequential())
def train_flow(
    data: Data = OFFICIAL_DATA_URL,
    models: Models = list(DEFAULT_MODELS),  # noqa: B006  (Prefect parameters are copied)
    epochs: Epochs = TRAIN.epochs,
    seed: Seed = RUN.seed,
    weights: Weights = "imagenet",
    artifacts: Artifacts = RUN.artifacts,
    refresh: Refresh = None,
    sha256: Sha256 = None,
    image_size: ImageSize = DATA.image_size,
    transfer_image_size: TransferImageSize = DATA.transfer_image_size,
    batch_size: BatchSize = TRAIN.batch_size,
    max_images_per_class: MaxImagesPerClass = DATA.max_images_per_class,
    finetune_epochs: FinetuneEpochs = TRAIN.finetune_epochs,
    feature_views: FeatureViews = TRAIN.feature_views,
    promote_margin: PromoteMargin = RUN.promote_margin,
    min_accuracy: MinAccuracy = None,
    min_class_recall: MinClassRecall = None,
    max_p_value: MaxPValue = None,
    train_retries: TrainRetries = RUN.train_retries,
    download_retries: DownloadRetries = RUN.download_retries,
    precision: Precision = TRAIN.precision,
    strategy: Strategy = TRAIN.strategy,
    offline: Offline = False,
    export: Export = True,
    keep_runs: KeepRuns = RUN.keep_runs,
    approve_promotion: ApprovePromotion = False,
    approval_timeout: ApprovalTimeout = RUN.approval_timeout,
    on_data_issue: OnDataIssue = RUN.on_data_issue,
    warm_start: WarmStartFrom = "none",
) -> ReportRecord:
    """Download, check and split, count, look, train every model, evaluate, promote, report."""
    quiet_tracebacks()
    # Runs from a deployment or the UI skip the command line: the same checks, before any stage.
    weights_used = check_run_inputs(data, models, weights, transfer_image_size)
    layout = Layout.at(artifacts)
    if layout.store is not None:  # an unusable store stops the run here, before any work
        layout.store.check()
        pull_production(layout)
        pull_files(layout, [layout.summary])
    # A URL is asked whether its archive changed (no body if not); the answer keys the download.
    source = check_source(data, layout.sources_memo, offline=offline)
    if source.warning:
        get_run_logger().warning("%s", source.warning)
    config = replace(
        TRAIN,
        epochs=epochs,
        batch_size=batch_size,
        finetune_epochs=finetune_epochs,
        feature_views=feature_views,
        precision=precision,
        strategy=strategy,
    )
    retries = {"download_retries": download_retries, "train_retries": train_retries}
    with Pipeline(layout, refresh=refresh, retries=retries) as run:
        archive = run.submit("download", data=data, sha256=sha256, revision=source.revision)
        images = run.submit("extract", archive=archive)
        manifest = run.submit("manifest", images=images)
        inspection = run.submit("inspect", manifest=manifest)
        split = run.submit(
            "split",
            manifest=manifest,
            inspection=inspection,
            seed=seed,
            test_fraction=DATA.test_fraction,
            flat_fractions=list(DATA.flat_fractions),
            max_images_per_class=max_images_per_class,
        )
        counts = run.submit("count", split=split)
        profile = run.submit("profile", split=split, inspection=inspection)
        figures = run.submit(
            "plot",
            split=split,
            seed=seed,
            image_size=image_size,
            per_class=DATA.samples_per_class,
            draws=DATA.augmentation_draws,
        )

        to_train = catalog.with_prerequisites(list(models))
        sides = {"image_size": image_size, "transfer_image_size": transfer_image_size}
        arrays, features, trained, evaluated = {}, {}, {}, {}
        for name in to_train:
            entry = catalog.spec(name)
            arrays[name] = run.submit("decode", split=split, image_size=sides[entry.input_size])
            if entry.trains_on_features:
                features[name] = run.submit(
                    "features",
                    model=name,
                    arrays=arrays[name],
                    weights=weights_used,
                    views=feature_views,
                    seed=seed,
                )
        probed = next(iter(features), None)  # the first frozen base's features serve the checks
        suspects = None
        if probed:
            suspects = run.submit(
                "suspects",
                split=split,
                features=features[probed],
                about=f"{probed} at {sides[catalog.spec(probed).input_size]}px, weights "
                f"{Path(weights_used).name if weights_used else 'none'}",
                seed=seed,
            )
        checks = run.submit(
            "check", profile=profile, suspects=suspects, on_data_issue=on_data_issue, seed=seed
        )
        if on_data_issue == "stop":
            run.settle()  # a failed check stops the run here, before any training
        warm, cold = {}, {}
        if warm_start == "production":  # from production's weights where it is that model
            data = manifest.result()
            warm, cold = warm_starts(layout, to_train, data.manifest_hash, data.classes)
        for name in to_train:
            entry = catalog.spec(name)
            trained[name] = run.submit(
                "train",
                model=name,
                arrays=arrays[name],
                features=features.get(name),
                start=trained[entry.starts_from] if entry.starts_from else None,
                settings=catalog.training_settings(name, config),
                seed=seed,
                weights=weights_used if entry.frozen_base else None,
                warm=warm.get(name),
            )
            evaluated[name] = run.submit(
                "evaluate",
                model=name,
                trained=trained[name],
                arrays=arrays[name],
                counts=counts,
                features=features.get(name),
            )
        run.settle()  # every stage so far; the first failure is raised here

        records = RunRecords(
            **run.results(
                manifest=manifest,
                split=split,
                counts=counts,
                figures=figures,
                arrays=arrays,
                features=features,
                trained=trained,
                evaluated=evaluated,
                inspection=inspection,
                profile=profile,
                suspects=suspects,
                checks=checks,
            )
        )
        policy = Policy(promote_margin, min_accuracy, min_class_recall, max_p_value)
        approval = None
        if approve_promotion:  # only "approved" lets a candidate through, whatever happens
            proposal = run.submit("propose", records=records, policy=policy)
            run.settle()
            approval = ask_for_approval(proposal.result(), approval_timeout)
        promotion = run.submit(
            "promote", records=records, policy=policy, export=export, approval=approval
        )
        run.settle()
        about = RunInfo(
            data=data,
            models=to_train,
            epochs=epochs,
            seed=seed,
            weights=weights_used,
            image_size=image_size,
            transfer_image_size=transfer_image_size,
            source_fresh=source.fresh,
            source_warning=source.warning,
            cold_starts=cold,
        )
        report = run.submit(
            "report",
            run=about,
            records=records,
            promotion=promotion,
            tasks=dict(run.outcomes),
            keep_runs=keep_runs,
        )
        run.settle()
        written = report.result()
    # Written on whichever host ran the report: this one gets its own copy to open.
    return replace(
        written,
        summary=local_copy(layout, written.summary),
        report=local_copy(layout, written.report, with_folder=True),
    )
