"""The catdog training pipeline as a Prefect flow: the recipe, its command line, its schedule.

python flows/train_flow.py --data cats_and_dogs_filtered.zip --models model1 --epochs 2
python flows/train_flow.py serve --cron "0 3 * * 1"
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
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

from prefect import flow, tags
from prefect.runtime import flow_run

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

    from flows.local_api import EarlyApiServer

from catdog.config import (
    DEFAULT_MODELS,
    MIN_MOBILENET_SIZE,
    OFFICIAL_DATA_URL,
    PipelineConfig,
    TrainConfig,
)
from catdog.errors import CatdogError
from catdog.layout import STAGES, Layout
from tasks.caching import bind_to_artifacts
from tasks.data import (
    DOWNLOAD_RETRIES,
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

for _library in ("catdog", "tasks"):  # Prefect gives them its handlers, not a level
    logging.getLogger(_library).setLevel(logging.INFO)

MODEL_NAMES = ("model1", "model2", "model3", "model4", "model4_finetune")
FROZEN_BASE = ("model4", "model4_finetune")


def _run_name() -> str:
    params = flow_run.parameters
    models = "+".join(params.get("models") or DEFAULT_MODELS)
    data = Path(str(params.get("data", "data")).rstrip("/")).name
    return f"{models} on {data} (seed {params.get('seed')}) {datetime.now(UTC):%Y-%m-%d %H:%M}"


def _training_settings(model: str, config: TrainConfig) -> dict[str, Any]:
    """Only the settings that change this model's result, so others keep their cache."""
    settings = asdict(config)
    unused = {"finetune_epochs", "finetune_at", "finetune_learning_rate"}
    if model not in FROZEN_BASE:
        unused |= {"feature_views", "dropout"}
    if model == "model4_finetune":
        unused = set()
    return {k: v for k, v in settings.items() if k not in unused}


@flow(name="catdog-train", flow_run_name=_run_name, log_prints=True)
def train_flow(
    data: str = OFFICIAL_DATA_URL,
    models: list[str] = list(DEFAULT_MODELS),  # noqa: B006  (Prefect parameters are copied)
    epochs: int = 20,
    seed: int = 1337,
    weights: str = "imagenet",
    artifacts: str = "artifacts",
    refresh: str | None = None,
    sha256: str | None = None,
    image_size: int = 160,
    transfer_image_size: int = 224,
    batch_size: int = 32,
    max_images_per_class: int | None = None,
    finetune_epochs: int = 10,
    feature_views: int = 1,
    promote_margin: float = 0.0,
    train_retries: int = 0,
    download_retries: int = DOWNLOAD_RETRIES,
    precision: str = "auto",
) -> dict[str, Any]:
    """Download, split, count, look, train every model, evaluate, report."""
    layout = Layout.at(artifacts)
    root = str(layout.root)
    base = PipelineConfig(seed=seed)
    config = TrainConfig(
        **{
            **asdict(base.train),
            "epochs": epochs,
            "batch_size": batch_size,
            "finetune_epochs": finetune_epochs,
            "feature_views": feature_views,
            "precision": precision,
        }
    )
    first_refreshed = STAGES.index(refresh) if refresh in STAGES else len(STAGES)
    if refresh == "all":
        first_refreshed = 0
    states: dict[str, str] = {}

    def run(task: Any, label: str, stage: str, **kwargs: Any) -> Any:
        bound = bind_to_artifacts(task, layout, refresh=STAGES.index(stage) >= first_refreshed)
        if stage == "train" and train_retries:
            bound = bound.with_options(retries=train_retries)
        if stage == "download":
            bound = bound.with_options(retries=download_retries)
        state = bound(**kwargs, artifacts=root, return_state=True)
        states[label] = state.name
        return state.result()

    archive = run(download_dataset, "download_dataset", "download", data=data, sha256=sha256)
    images = run(extract_dataset, "extract_dataset", "extract", archive=archive)
    manifest = run(build_manifest, "build_manifest", "manifest", images=images)
    split = run(
        split_dataset,
        "split_dataset",
        "split",
        manifest=manifest,
        seed=seed,
        test_fraction=base.data.test_fraction,
        flat_fractions=list(base.data.flat_fractions),
        max_images_per_class=max_images_per_class,
    )
    counts = run(count_labels, "count_labels", "count", split=split)
    figures = run(
        plot_samples, "plot_samples", "plot", split=split, seed=seed, image_size=image_size
    )
    to_train = list(models)
    if "model4_finetune" in to_train and "model4" not in to_train:
        to_train.insert(to_train.index("model4_finetune"), "model4")
    input_size = {
        name: transfer_image_size if name in FROZEN_BASE else image_size for name in to_train
    }
    arrays_of_size = {
        size: run(decode_images, f"decode_images[{size}]", "decode", split=split, image_size=size)
        for size in dict.fromkeys(input_size.values())
    }
    arrays = {name: arrays_of_size[size] for name, size in input_size.items()}

    needs_weights = any(name in FROZEN_BASE for name in to_train)
    weights_arg = weights if needs_weights else None
    features = None
    if needs_weights:
        features = run(
            extract_features,
            "extract_features",
            "features",
            arrays=arrays_of_size[transfer_image_size],
            weights=weights_arg,
            views=feature_views,
            seed=seed,
        )
    trained: dict[str, dict[str, Any]] = {}
    for name in to_train:
        trained[name] = run(
            train_model,
            f"train_model[{name}]",
            "train",
            model=name,
            arrays=arrays[name],
            features=features if name == "model4" else None,
            start=trained.get("model4") if name == "model4_finetune" else None,
            settings=_training_settings(name, config),
            seed=seed,
            weights=weights_arg if name in FROZEN_BASE else None,
        )
    evaluated = {
        name: run(
            evaluate_model,
            f"evaluate_model[{name}]",
            "evaluate",
            model=name,
            trained=trained[name],
            arrays=arrays[name],
            baseline=counts["baseline"]["validation"],
        )
        for name in to_train
    }
    return write_report(
        run={
            "data": data,
            "models": to_train,
            "epochs": epochs,
            "seed": seed,
            "weights": weights_arg,
            "image_size": image_size,
            "transfer_image_size": transfer_image_size if needs_weights else None,
            "name": _run_name_safe(),
        },
        manifest=manifest,
        split=split,
        counts=counts,
        figures=figures,
        arrays=arrays,
        features=features,
        trained=trained,
        evaluated=evaluated,
        task_states=states,
        artifacts_used=[
            record["dir"]
            for record in (
                archive,
                images,
                manifest,
                split,
                counts,
                figures,
                *arrays_of_size.values(),
                features,
                *trained.values(),
                *evaluated.values(),
            )
            if record
        ],
        promote_margin=promote_margin,
        artifacts=root,
    )


def _run_name_safe() -> str:
    return str(flow_run.get_name() or "local")


# ----------------------------------------------------------------------------- command line


class UsageError(Exception):
    """A bad command-line value; reported in one line with exit code 2."""


def _models(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODEL_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown model {', '.join(unknown) or '(none given)'}; choose from "
            + ", ".join(MODEL_NAMES)
        )
    return list(dict.fromkeys(names))


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python flows/train_flow.py",
        description="Train and compare image classifiers (default: the cats-vs-dogs "
        "assignment's four models) as a Prefect flow with cached stages.",
        epilog="Subcommand: `python flows/train_flow.py serve --cron '0 3 * * 1' [options]` "
        "serves the same flow on a schedule.",
    )
    env = os.environ.get
    parser.add_argument(
        "--data",
        default=env("CATDOG_DATA", OFFICIAL_DATA_URL),
        help="dataset: http(s) or file URL, a .zip, or a folder of class "
        "folders (env CATDOG_DATA; default: the official archive URL)",
    )
    parser.add_argument(
        "--sha256",
        default=env("CATDOG_DATA_SHA256"),
        help="expected SHA-256 of the downloaded archive",
    )
    parser.add_argument(
        "--models",
        type=_models,
        default=list(DEFAULT_MODELS),
        help=f"comma-separated, from {', '.join(MODEL_NAMES)} (default {','.join(DEFAULT_MODELS)})",
    )
    parser.add_argument("--epochs", type=_positive, default=20, help="epochs per model (20)")
    parser.add_argument(
        "--finetune-epochs",
        type=_positive,
        default=10,
        help="extra epochs for model4_finetune (10)",
    )
    parser.add_argument("--seed", type=int, default=1337, help="split, sampling and training seed")
    parser.add_argument(
        "--weights",
        default=env("CATDOG_WEIGHTS", "imagenet"),
        help="MobileNetV2 weights for model4*: 'imagenet' (downloaded by Keras) "
        "or a path to an .h5 file (env CATDOG_WEIGHTS)",
    )
    parser.add_argument(
        "--artifacts",
        default=env("CATDOG_ARTIFACTS", "artifacts"),
        help="output folder (env CATDOG_ARTIFACTS; default ./artifacts)",
    )
    parser.add_argument(
        "--refresh",
        nargs="?",
        const="all",
        default=None,
        choices=["all", *STAGES],
        metavar="STAGE",
        help=f"ignore caches: all stages, or STAGE and every later one ({', '.join(STAGES)})",
    )
    parser.add_argument(
        "--image-size", type=_positive, default=160, help="square side of the images (160)"
    )
    parser.add_argument(
        "--transfer-image-size",
        type=_positive,
        default=224,
        help="square side of the images for model4*, the size MobileNetV2's ImageNet weights "
        "were trained at (224)",
    )
    parser.add_argument("--batch-size", type=_positive, default=32, help="batch size (32)")
    parser.add_argument(
        "--max-images-per-class",
        type=_positive,
        default=None,
        help="use at most this many images per class and split (quick tries)",
    )
    parser.add_argument(
        "--feature-views",
        type=_positive,
        default=1,
        help="cached views per training image for model4: the image, its mirror image, then "
        "draws of the augmentation (1)",
    )
    parser.add_argument(
        "--promote-margin",
        type=float,
        default=0.0,
        help="accuracy a new best model must gain over production (0.0)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "mixed_bfloat16"],
        help="training dtype policy; auto uses bfloat16 for model1, model3 and model4* where "
        "the CPU or GPU computes it natively, float32 otherwise (default auto)",
    )
    parser.add_argument(
        "--download-retries",
        type=int,
        default=DOWNLOAD_RETRIES,
        help=f"retries of a transient download failure, with backoff ({DOWNLOAD_RETRIES})",
    )
    parser.add_argument(
        "--train-retries",
        type=int,
        default=0,
        help="retries of a failed training task; each resumes (0)",
    )
    return parser


def _check(args: argparse.Namespace) -> None:
    """Fail before any work on inputs that cannot succeed."""
    from catdog.data import sources

    source = sources.parse_source(args.data)
    if source.kind == "zip":
        sources.check_zip(source.path, args.data)
    elif source.kind == "folder":
        from catdog.data.extract import find_dataset_root

        find_dataset_root(source.path)
    if any(name in FROZEN_BASE for name in args.models):
        if args.transfer_image_size < MIN_MOBILENET_SIZE:
            raise UsageError(
                f"--transfer-image-size {args.transfer_image_size}: MobileNetV2 needs at least "
                f"{MIN_MOBILENET_SIZE}"
            )
        if args.weights == "imagenet":
            # Fetched (or found in Keras's cache) now, so that no network failure can stop
            # the run half-way; the file then keys the cache by its content like any other.
            from catdog.models import fetch_imagenet_weights

            args.weights = fetch_imagenet_weights(args.transfer_image_size)
        elif args.weights != "none":
            path = Path(args.weights).expanduser()
            if not path.is_file():
                raise UsageError(f"--weights {args.weights}: no such file")
            args.weights = str(path.resolve())
    if args.max_images_per_class is not None and args.max_images_per_class < 2:
        raise UsageError("--max-images-per-class must be at least 2")


def _flow_parameters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "data": args.data,
        "models": args.models,
        "epochs": args.epochs,
        "seed": args.seed,
        "weights": args.weights,
        "artifacts": str(Path(args.artifacts).expanduser().resolve()),
        "refresh": args.refresh,
        "sha256": args.sha256,
        "image_size": args.image_size,
        "transfer_image_size": args.transfer_image_size,
        "batch_size": args.batch_size,
        "max_images_per_class": args.max_images_per_class,
        "finetune_epochs": args.finetune_epochs,
        "feature_views": args.feature_views,
        "promote_margin": args.promote_margin,
        "train_retries": args.train_retries,
        "download_retries": args.download_retries,
        "precision": args.precision,
    }


def build_deployment(args: argparse.Namespace) -> RunnerDeployment:
    """The deployment `serve` registers: this flow, `--cron` or `--interval`, the options given."""
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Cron, Interval

    try:
        schedule = Cron(args.cron, timezone="UTC") if args.cron else Interval(args.interval)
    except ValueError as error:
        raise UsageError(f"--cron {args.cron!r}: not a valid cron schedule") from error
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
    schedule.add_argument("--interval", type=_positive, help="seconds between runs")
    parser.add_argument("--name", default="scheduled-retraining", help="deployment name")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    serving = bool(argv) and argv[0] == "serve"
    parser = _serve_parser() if serving else _parser()
    args = parser.parse_args(argv[1:] if serving else argv)
    try:
        _check(args)
        if serving:
            from prefect import serve

            serve(build_deployment(args))
            return 0
        with _EARLY_API.in_use() if _EARLY_API else nullcontext(), tags("catdog", *args.models):
            result = train_flow(**_flow_parameters(args))
    except (CatdogError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if _EARLY_API:
            _EARLY_API.stop()
    print(f"summary: {result['summary']}\nreport:  {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
