"""The catdog training pipeline as a Prefect flow: the recipe, its command line, its schedule.

python flows/train_flow.py --data cats_and_dogs_filtered.zip --models model1 --epochs 2
python flows/train_flow.py serve --cron "0 3 * * 1"
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import catdog  # noqa: F401  (quiets TensorFlow before any task imports it)
except ImportError:  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# Before Prefect reads its settings: no telemetry (runs are often offline), and the library's
# own log lines (download progress, skipped images) shown beside the tasks' in terminal and UI.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "catdog,tasks")
# The library logs outside flow runs too (the command line's checks, a weights download): those
# lines belong in the terminal only, with no warning that they did not reach the API.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# The temporary API server can take longer than Prefect's default 20 s on a busy machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _is_plain_run(argv: list[str]) -> bool:
    return argv[:1] != ["serve"] and not {"-h", "--help"} & set(argv)


# A plain run starts its temporary API server first, so that the server starts up while this
# process imports Prefect and the tasks (see flows/local_api.py).
_EARLY_API: EarlyApiServer | None = None
if __name__ == "__main__" and _is_plain_run(sys.argv[1:]):
    from flows.local_api import EarlyApiServer

    _EARLY_API = EarlyApiServer.spawn()

from prefect import flow, get_run_logger, tags
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

    from flows.local_api import EarlyApiServer

from catdog import catalog
from catdog.catalog import DEFAULT_MODELS
from catdog.checks import check_run
from catdog.cluster import DEFAULT_CPU_WORKERS
from catdog.config import OFFICIAL_DATA_URL, DataConfig, PipelineConfig, TrainConfig
from catdog.data.freshness import check_source
from catdog.errors import CatdogError
from catdog.layout import STAGES, Layout
from catdog.summary import StageRecords
from flows.cli import add_flow_options, flow_parameters
from flows.parameters import (
    Artifacts,
    BatchSize,
    Data,
    DownloadRetries,
    Epochs,
    FeatureViews,
    FinetuneEpochs,
    ImageSize,
    MaxImagesPerClass,
    Models,
    Offline,
    Precision,
    PromoteMargin,
    Refresh,
    Seed,
    Sha256,
    Strategy,
    TrainRetries,
    TransferImageSize,
    Weights,
)
from flows.runners import RUNNERS, on_a_gpu, sequential, task_runner
from tasks.caching import bind_to_artifacts
from tasks.data import (
    build_manifest,
    count_labels,
    decode_images,
    download_dataset,
    extract_dataset,
    plot_samples,
    split_dataset,
)
from tasks.report import write_report
from tasks.training import evaluate_model, extract_features, train_model

RUN, DATA, TRAIN = PipelineConfig(), DataConfig(), TrainConfig()


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
    artifacts: Artifacts = "artifacts",
    refresh: Refresh = None,
    sha256: Sha256 = None,
    image_size: ImageSize = DATA.image_size,
    transfer_image_size: TransferImageSize = DATA.transfer_image_size,
    batch_size: BatchSize = TRAIN.batch_size,
    max_images_per_class: MaxImagesPerClass = DATA.max_images_per_class,
    finetune_epochs: FinetuneEpochs = TRAIN.finetune_epochs,
    feature_views: FeatureViews = TRAIN.feature_views,
    promote_margin: PromoteMargin = RUN.promote_margin,
    train_retries: TrainRetries = RUN.train_retries,
    download_retries: DownloadRetries = RUN.download_retries,
    precision: Precision = TRAIN.precision,
    strategy: Strategy = TRAIN.strategy,
    offline: Offline = False,
) -> dict[str, Any]:
    """Download, split, count, look, train every model, evaluate, report."""
    # Runs from a deployment or the UI skip the command line: the same checks, before any stage.
    weights_used = check_run(data, models, weights, transfer_image_size)
    layout = Layout.at(artifacts)
    # A URL is asked whether its archive changed (no body if not); the answer keys the download.
    source = check_source(data, layout.sources_memo, offline=offline)
    if source.warning:
        get_run_logger().warning("%s", source.warning)
    root = str(layout.root)
    settings = {
        **asdict(TRAIN),
        "epochs": epochs,
        "batch_size": batch_size,
        "finetune_epochs": finetune_epochs,
        "feature_views": feature_views,
        "precision": precision,
        "strategy": strategy,
    }
    first_refreshed = 0 if refresh == "all" else STAGES.index(refresh) if refresh else len(STAGES)
    futures: dict[str, PrefectFuture[Any]] = {}

    def submit(task: Any, label: str, stage: str, *, gpu: bool = False, **kwargs: Any) -> Any:
        """Submit `task`; what it returns is its future, which later tasks take as input."""
        bound = bind_to_artifacts(task, layout, refresh=STAGES.index(stage) >= first_refreshed)
        if stage == "train" and train_retries:
            bound = bound.with_options(retries=train_retries)
        if stage == "download":
            bound = bound.with_options(retries=download_retries)
        with on_a_gpu(gpu):
            futures[label] = bound.submit(**kwargs, artifacts=root)
        return futures[label]

    archive = submit(
        download_dataset,
        "download_dataset",
        "download",
        data=data,
        sha256=sha256,
        revision=source.revision,
    )
    images = submit(extract_dataset, "extract_dataset", "extract", archive=archive)
    manifest = submit(build_manifest, "build_manifest", "manifest", images=images)
    split = submit(
        split_dataset,
        "split_dataset",
        "split",
        manifest=manifest,
        seed=seed,
        test_fraction=DATA.test_fraction,
        flat_fractions=list(DATA.flat_fractions),
        max_images_per_class=max_images_per_class,
    )
    counts = submit(count_labels, "count_labels", "count", split=split)
    submit(plot_samples, "plot_samples", "plot", split=split, seed=seed, image_size=image_size)

    to_train = catalog.with_prerequisites(list(models))
    sides = {"image_size": image_size, "transfer_image_size": transfer_image_size}
    input_size = {name: sides[catalog.spec(name).input_size] for name in to_train}
    arrays_of_size = {
        size: submit(
            decode_images, f"decode_images[{size}]", "decode", split=split, image_size=size
        )
        for size in dict.fromkeys(input_size.values())
    }
    arrays = {name: arrays_of_size[size] for name, size in input_size.items()}
    features = {
        name: submit(
            extract_features,
            "extract_features",
            "features",
            gpu=True,
            model=name,
            arrays=arrays[name],
            weights=weights_used,
            views=feature_views,
            seed=seed,
        )
        for name in to_train
        if catalog.spec(name).trains_on_features
    }
    trained: dict[str, Any] = {}
    for name in to_train:
        entry = catalog.spec(name)
        trained[name] = submit(
            train_model,
            f"train_model[{name}]",
            "train",
            gpu=True,
            model=name,
            arrays=arrays[name],
            features=features.get(name),
            start=trained[entry.starts_from] if entry.starts_from else None,
            settings=catalog.training_settings(name, settings),
            seed=seed,
            weights=weights_used if entry.frozen_base else None,
        )
    # Counting is quick and comes first: waiting for it here holds up no training.
    baseline = counts.result()["baseline"]["validation"]
    for name in to_train:
        submit(
            evaluate_model,
            f"evaluate_model[{name}]",
            "evaluate",
            gpu=True,
            model=name,
            trained=trained[name],
            arrays=arrays[name],
            baseline=baseline,
        )
    # In submission order, which is stage order: the first stage that failed raises.
    done = {label: future.result() for label, future in futures.items()}
    return write_report(
        run={
            "data": data,
            "models": to_train,
            "epochs": epochs,
            "seed": seed,
            "weights": weights_used,
            "image_size": image_size,
            "transfer_image_size": (
                transfer_image_size
                if any(catalog.spec(name).input_size == "transfer_image_size" for name in to_train)
                else None
            ),
            "name": str(flow_run.get_name() or "local"),
            "source_fresh": source.fresh,
            "source_warning": source.warning,
        },
        records=StageRecords(
            manifest=done["build_manifest"],
            split=done["split_dataset"],
            counts=done["count_labels"],
            figures=done["plot_samples"],
            arrays={name: done[f"decode_images[{size}]"] for name, size in input_size.items()},
            # One feature set at most today: the catalog has one model trained on features.
            features=done.get("extract_features"),
            trained={name: done[f"train_model[{name}]"] for name in to_train},
            evaluated={name: done[f"evaluate_model[{name}]"] for name in to_train},
        ),
        task_states={label: future.state.name for label, future in futures.items()},
        artifacts_used=[record["dir"] for record in done.values()],
        promote_margin=promote_margin,
        artifacts=root,
    )


# ----------------------------------------------------------------------------- command line

# Parameters whose default an environment variable overrides on the command line.
ENV = {
    "data": "CATDOG_DATA",
    "sha256": "CATDOG_DATA_SHA256",
    "weights": "CATDOG_WEIGHTS",
    "artifacts": "CATDOG_ARTIFACTS",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python flows/train_flow.py",
        description="Train and compare image classifiers (default: the cats-vs-dogs "
        "assignment's models) as a Prefect flow with cached stages.",
        epilog="Models: "
        + "; ".join(f"{spec.name}: {spec.description}" for spec in catalog.MODELS)
        + ". Subcommand: `python flows/train_flow.py serve --cron '0 3 * * 1' [options]` "
        "serves the same flow on a schedule.",
    )
    add_flow_options(parser, train_flow.fn, env=ENV, optional_value={"refresh": "all"})
    return parser


def _at_least_one(unit: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number >= 1 (of `unit`, as the error message says)."""

    def convert(value: str) -> int:
        if not value.isdigit() or int(value) < 1:
            of = f" of {unit}" if unit else ""
            raise argparse.ArgumentTypeError(f"{value!r}: must be a whole number{of}, >= 1")
        return int(value)

    return convert


def _run_parser() -> argparse.ArgumentParser:
    """The run options plus where the tasks run."""
    parser = _parser()
    where = parser.add_argument_group("where the tasks run")
    where.add_argument(
        "--runner",
        choices=RUNNERS,
        default="sequential",
        help="sequential: one task at a time in this process; dask: a temporary Dask cluster "
        "on this machine, independent tasks side by side (default: sequential)",
    )
    where.add_argument(
        "--workers",
        type=_at_least_one(),
        metavar="N",
        help="worker processes of --runner dask, each with its share of the cores and at most "
        f"one GPU (default: one per visible GPU, else {DEFAULT_CPU_WORKERS})",
    )
    where.add_argument(
        "--dask-address",
        metavar="tcp://HOST:PORT",
        help="run the tasks on the Dask cluster whose scheduler listens there (see README, "
        "Scaling out)",
    )
    return parser


def _flow_parameters(args: argparse.Namespace) -> dict[str, Any]:
    parameters = flow_parameters(args, train_flow.fn)
    parameters["artifacts"] = str(Path(args.artifacts).expanduser().resolve())
    return parameters


class ScheduleError(Exception):
    """A bad schedule for `serve`; reported in one line with exit code 2."""


def build_deployment(args: argparse.Namespace) -> RunnerDeployment:
    """The deployment `serve` registers: this flow, `--cron` or `--interval`, the options given."""
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Cron, Interval

    try:
        schedule = Cron(args.cron, timezone="UTC") if args.cron else Interval(args.interval)
    except ValueError as error:
        raise ScheduleError(f"--cron {args.cron!r}: not a valid cron schedule") from error
    deployment = train_flow.to_deployment(
        name=args.name,
        schedules=[schedule],
        parameters=_flow_parameters(args),
        tags=["catdog", "scheduled"],
    )
    assert isinstance(deployment, RunnerDeployment)
    return deployment


def _serve_parser() -> argparse.ArgumentParser:
    """The run options plus a schedule and a deployment name, for `serve`."""
    parser = _parser()
    parser.prog += " serve"
    parser.description = "Serve the flow on a schedule: register the deployment, then run "
    parser.description += "each scheduled run in this process until stopped (Ctrl-C)."
    parser.epilog = None
    schedule = parser.add_mutually_exclusive_group(required=True)
    schedule.add_argument("--cron", help="cron schedule in UTC, e.g. '0 3 * * 1'")
    schedule.add_argument(
        "--interval", type=_at_least_one("seconds"), metavar="SECONDS", help="seconds between runs"
    )
    parser.add_argument("--name", default="scheduled-retraining", help="deployment name")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    serving = bool(argv) and argv[0] == "serve"
    parser = _serve_parser() if serving else _run_parser()
    args = parser.parse_args(argv[1:] if serving else argv)
    if not serving and args.workers and (args.dask_address or args.runner != "dask"):
        parser.error(
            "--workers sizes the cluster of --runner dask; a --dask-address cluster "
            "has its own workers"
        )
    try:
        if resolved := check_run(args.data, args.models, args.weights, args.transfer_image_size):
            args.weights = resolved
        if serving:
            from prefect import serve

            serve(build_deployment(args))
            return 0
        runner = task_runner(args.runner, args.workers, args.dask_address)
        with _EARLY_API.in_use() if _EARLY_API else nullcontext(), tags("catdog", *args.models):
            result = train_flow.with_options(task_runner=runner)(**_flow_parameters(args))
    except (CatdogError, ScheduleError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if _EARLY_API:
            _EARLY_API.stop()
    print(f"summary: {result['summary']}\nreport:  {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
