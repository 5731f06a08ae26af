"""Model tasks: frozen-base features, training (resumable), and evaluation on the test split."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from prefect import get_run_logger, task

from catdog import catalog
from catdog.hashing import HashMemo, code_fingerprint, sha256_file
from catdog.layout import MODEL_FILE, Layout
from tasks import ui
from tasks.caching import ContentAddressed, stage_output

TRAIN_CODE = ("catdog.training", "catdog.models", "catdog.features", "catdog.arrays")


def _weights_fingerprint(inputs: dict[str, Any]) -> str | None:
    """A weights file is identified by its content, not by where it lies."""
    weights = inputs.get("weights")
    if weights and weights not in ("imagenet", "none"):
        return sha256_file(weights, HashMemo(Layout.at(inputs["artifacts"]).hash_memo))
    return weights


def _model_fingerprint(inputs: dict[str, Any]) -> list[str | None]:
    """The weights, and the code of the model's builder, wherever the catalog says it lives
    (a builder outside the training modules would otherwise escape the key)."""
    builder_module = catalog.spec(inputs["model"]).builder.partition(":")[0]
    return [_weights_fingerprint(inputs), code_fingerprint(builder_module)]


def load_arrays(layout: Layout, arrays: dict[str, Any], split: str) -> tuple[Any, Any]:
    """A decoded split's images (read from disk a batch at a time) and labels."""
    from catdog.data.images import open_split

    return open_split(layout.resolve(arrays["dir"]), split)


@task(
    name="extract_features",
    cache_policy=ContentAddressed(
        stage="features", code=TRAIN_CODE, fingerprint=_model_fingerprint
    ),
)
def extract_features(
    model: str,
    arrays: dict[str, Any],
    weights: str | None,
    views: int,
    seed: int,
    artifacts: str,
) -> dict[str, Any]:
    """Frozen MobileNetV2 features of every training view and validation image, computed once."""
    from catdog.arrays import require_space
    from catdog.features import extract_features as embed
    from catdog.features import feature_bytes

    layout = Layout.at(artifacts)
    started = time.perf_counter()
    x_train, y_train = load_arrays(layout, arrays, "train")
    x_val, y_val = load_arrays(layout, arrays, "validation")
    with stage_output(layout, "features") as (folder, record):
        require_space(folder, feature_bytes(len(y_train), len(y_val), views), "extract_features")
        features = embed(
            x_train,
            y_train,
            x_val,
            y_val,
            folder,
            model_name=model,
            num_classes=len(arrays["classes"]),
            weights=weights,
            views=views,
            seed=seed,
        )
        record.update(views=views, dim=features.dim, seconds=time.perf_counter() - started)
    get_run_logger().info(
        "base features: %d train views x %d images, %d validation images in %.0f s",
        views,
        len(y_train),
        len(y_val),
        record["seconds"],
    )
    return record


@task(
    name="train_model",
    task_run_name="train_model[{model}]",
    cache_policy=ContentAddressed(
        stage="train", code=TRAIN_CODE, name_input="model", fingerprint=_model_fingerprint
    ),
)
def train_model(
    model: str,
    arrays: dict[str, Any],
    features: dict[str, Any] | None,
    start: dict[str, Any] | None,
    settings: dict[str, Any],
    seed: int,
    weights: str | None,
    artifacts: str,
) -> dict[str, Any]:
    """Train one model; a run that died continues from its last finished epoch."""
    from catdog import training
    from catdog.config import TrainConfig
    from catdog.features import FeatureSet

    logger = get_run_logger()
    layout = Layout.at(artifacts)
    config = TrainConfig(**settings)
    started = time.perf_counter()
    num_classes = len(arrays["classes"])
    total_epochs = config.finetune_epochs if start else config.epochs
    progress = ui.start_progress(f"{model}: epochs done of {total_epochs}")

    def images() -> training.TrainingData:
        x_train, y_train = load_arrays(layout, arrays, "train")
        x_val, y_val = load_arrays(layout, arrays, "validation")
        return training.TrainingData(x_train, y_train, x_val, y_val, num_classes)

    def cached_features() -> FeatureSet:
        return FeatureSet.load(layout.resolve(features["dir"]), num_classes)

    def on_epoch(epoch: int, total: int, row: dict[str, float]) -> None:
        logger.info(
            "%s epoch %d/%d: accuracy %.3f, val_accuracy %.3f, loss %.3f, val_loss %.3f (%.1f s)",
            model,
            epoch,
            total,
            row.get("accuracy", 0),
            row.get("val_accuracy", 0),
            row.get("loss", 0),
            row.get("val_loss", 0),
            row["seconds"],
        )
        first = total - total_epochs
        ui.update_progress(progress, 100.0 * (epoch - first) / max(total_epochs, 1))

    with stage_output(layout, "train", model, resumable=True) as (folder, record):
        result = training.train(
            model,
            folder,
            config=config,
            seed=seed,
            weights=weights,
            input_shape=(arrays["image_size"], arrays["image_size"], 3),
            images=images,
            features=cached_features if features else None,
            start_dir=layout.resolve(start["dir"]) if start else None,
            on_epoch=on_epoch,
        )
        record.update(
            model=model,
            epochs=len(result.epoch_seconds),
            history=result.history,
            epoch_seconds=result.epoch_seconds,
            best_epoch=result.best_epoch,
            saved_from=result.extra.get("saved_from", model),
            replicas=result.extra.get("replicas", 1),
            trainable_params=result.trainable_params,
            total_params=result.total_params,
            seconds=time.perf_counter() - started,
            # Which process trained it: the flow's own, or a Dask worker's.
            worker={"host": socket.gethostname(), "pid": os.getpid()},
            settings=settings,
            seed=seed,
            weights=weights,
            inputs={
                "arrays": arrays["key"],
                "features": features and features["key"],
                "start": start and start["key"],
            },
        )
        (folder / "config.json").write_text(json.dumps(record, indent=2, default=str))
    ui.update_progress(progress, 100.0)
    return record


@task(
    name="evaluate_model",
    task_run_name="evaluate_model[{model}]",
    cache_policy=ContentAddressed(
        stage="evaluate", code=("catdog.evaluation", "catdog.plots"), name_input="model"
    ),
)
def evaluate_model(
    model: str, trained: dict[str, Any], arrays: dict[str, Any], baseline: float, artifacts: str
) -> dict[str, Any]:
    """Score a trained model on the test split: accuracy, loss, confusion matrix, errors."""
    from catdog.evaluation import load_model, score_model
    from catdog.plots import evaluation_figures, save_figure

    layout = Layout.at(artifacts)
    classes = list(arrays["classes"])
    x_test, y_test = load_arrays(layout, arrays, "test")
    network = load_model(layout.resolve(trained["dir"]) / MODEL_FILE)
    metrics = score_model(network, x_test, y_test, classes)
    with stage_output(layout, "evaluate", model) as (folder, record):
        figures = evaluation_figures(
            model, trained["history"], baseline, metrics, x_test, y_test, classes
        )
        for file_name, figure in figures.items():
            save_figure(figure, folder / file_name)
        # Predictions stay (the promotion gate compares them with production's, image by
        # image); the per-image confidences and the error ranking are only for the figures.
        summary = {
            k: v for k, v in metrics.items() if k not in ("confidence", "most_confident_errors")
        }
        record.update(model=model, **summary)
    get_run_logger().info(
        "%s: test accuracy %.3f, test loss %.3f", model, metrics["accuracy"], metrics["loss"]
    )
    return record
