"""Model tasks: frozen-base features, training (resumable), and evaluation on the test split."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from contextlib import closing
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger

from catdog import catalog
from catdog.errors import ModelError, RunStopped
from catdog.hashing import HashMemo, code_fingerprint, sha256_file, sha256_file_uncached
from catdog.layout import MODEL_FILE, PROBABILITIES_FILE, Layout
from catdog.mirror import Checkpoints, pull_checkpoint, pull_files
from catdog.stage_records import (
    ArraysRecord,
    CountsRecord,
    EvaluationRecord,
    FeaturesRecord,
    TrainedRecord,
)
from catdog.warm import WarmStart
from tasks import ui
from tasks.caching import check_not_stopped, raised, stage_output, stage_task

if TYPE_CHECKING:
    from catdog.features import FeatureSet
    from catdog.training import TrainingData


# A fingerprint reads the task's inputs by parameter name, as the cache policy hands them over
# (a dict of every type the task takes).
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


def _training_fingerprint(inputs: dict[str, Any]) -> list[str | None]:
    """The model's, and the content of the production model a warm start begins from."""
    warm: WarmStart | None = inputs.get("warm")
    return [*_model_fingerprint(inputs), warm.sha256 if warm else None]


def _warm_file(layout: Layout, warm: WarmStart) -> Path:
    """The production model a warm start begins from, in this host's copy: fetched from the
    store on a host that lacks it (a worker that shares only the store), and checked."""
    path = layout.resolve(warm.model_file)
    if layout.store is not None and not path.is_file():
        pull_files(layout, [path])
        if not path.is_file() or sha256_file_uncached(path) != warm.sha256:
            path.unlink(missing_ok=True)
            raise ModelError(
                f"--warm-start production: {warm.model_file} is not in the store "
                f"{layout.location} as production named it; run without --warm-start"
            )
    return path


def retry_unless_stopped(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed training (it resumes), but not one stopped because the run failed."""
    return not isinstance(raised(state), RunStopped | None)


def load_arrays(layout: Layout, arrays: ArraysRecord, split: str) -> tuple[Any, Any]:
    """A decoded split's images (read from disk a batch at a time) and labels."""
    from catdog.data.images import open_split
    from catdog.pieces import PieceStore

    pixels = None
    if arrays.pieces:
        pixels = PieceStore(layout.resolve(arrays.pieces[0]), HashMemo(layout.hash_memo))
    return open_split(layout.resolve(arrays.dir), split, pixels)


@stage_task("features", fingerprint=_model_fingerprint)
def extract_features(
    model: str, arrays: ArraysRecord, weights: str | None, views: int, seed: int, artifacts: str
) -> FeaturesRecord:
    """Frozen MobileNetV2 features of every training view and validation image, computed once."""
    from catdog.arrays import require_space
    from catdog.data.images import split_keys
    from catdog.features import extract_features as embed
    from catdog.features import feature_bytes
    from catdog.pieces import PieceStore, feature_pieces

    layout = Layout.at(artifacts)
    memo = HashMemo(layout.hash_memo)
    inputs = {"model": model, "weights": weights, "artifacts": artifacts}
    made_by = {
        "model": model,
        "base": _model_fingerprint(inputs),  # its weights' content and its builder's code
        "pixels": arrays.pieces,  # the pixel pieces' folder: their size, code and decoder
        "code": code_fingerprint("catdog.features", "catdog.models", "catdog.layers"),
    }
    random_base = weights in (None, "none")

    def pieces(view: int) -> PieceStore:
        # An augmented view's draws follow the seed, and so does a randomly initialised base.
        seeded = view >= 2 or random_base
        return feature_pieces(
            layout.pieces_dir, {**made_by, "view": view, "seed": seed if seeded else None}, memo
        )

    with stage_output(layout) as out:
        x_train, y_train = load_arrays(layout, arrays, "train")
        x_val, y_val = load_arrays(layout, arrays, "validation")
        decoded = layout.resolve(arrays.dir)
        require_space(
            out.folder, 2 * feature_bytes(len(y_train), len(y_val), views), "extract_features"
        )
        features, reuse = embed(
            x_train,
            y_train,
            x_val,
            y_val,
            out.folder,
            model_name=model,
            num_classes=len(arrays.classes),
            weights=weights,
            views=views,
            seed=seed,
            train_keys=split_keys(decoded, "train"),
            val_keys=split_keys(decoded, "validation"),
            pieces=pieces,
        )
        out.facts.update(
            model=model,
            views=views,
            dim=features.dim,
            per_image=reuse.to_json(),
            pieces=[layout.relative(pieces(view).folder) for view in range(max(1, views))],
        )
    get_run_logger().info(
        "base features: %d train views x %d images, %d validation images in %.0f s",
        views,
        len(y_train),
        len(y_val),
        out.record.seconds,
    )
    return out.record


def _training_data(layout: Layout, arrays: ArraysRecord) -> TrainingData:
    """The decoded training and validation images, for a model that trains on them."""
    from catdog import training

    x_train, y_train = load_arrays(layout, arrays, "train")
    x_val, y_val = load_arrays(layout, arrays, "validation")
    return training.TrainingData(x_train, y_train, x_val, y_val, len(arrays.classes))


def _cached_features(
    layout: Layout, arrays: ArraysRecord, features: FeaturesRecord | None
) -> Callable[[], FeatureSet] | None:
    """What loads the cached features, for a model that trains on them."""
    from catdog.features import FeatureSet

    if features is None:
        return None
    return partial(FeatureSet.load, layout.resolve(features.dir), len(arrays.classes))


def _input_keys(
    arrays: ArraysRecord, features: FeaturesRecord | None, start: TrainedRecord | None
) -> dict[str, str | None]:
    """The keys of the stage outputs a training read."""
    return {
        "arrays": arrays.key,
        "features": features.key if features else None,
        "start": start.key if start else None,
    }


@stage_task(
    "train",
    fingerprint=_training_fingerprint,
    unkeyed=("warm",),
    retry_condition_fn=retry_unless_stopped,
)
def train_model(
    model: str,
    arrays: ArraysRecord,
    features: FeaturesRecord | None,
    start: TrainedRecord | None,
    settings: dict[str, Any],  # TrainConfig's fields as JSON: keyed by value and recorded
    seed: int,
    weights: str | None,
    artifacts: str,
    warm: WarmStart | None = None,
) -> TrainedRecord:
    """Train one model, from production's weights with `warm`; a run that died continues from
    its last finished epoch."""
    from catdog import training
    from catdog.config import TrainConfig

    logger = get_run_logger()
    layout = Layout.at(artifacts)
    config = TrainConfig(**settings)
    total_epochs = config.finetune_epochs if start else config.epochs
    progress = ui.start_progress(f"{model}: epochs done of {total_epochs}")

    with stage_output(layout, model, resumable=True) as out:
        # With a store, the epochs of a host lost mid-training come first, and this host's
        # epochs go to the store as they end.
        if (pulled := pull_checkpoint(layout, out.folder)) is not None:
            logger.info("%s: going on from epoch %d, checkpointed by another host", model, pulled)
        checkpoints = Checkpoints(layout, out.folder)
        warm_from = replace(warm, model_file=str(_warm_file(layout, warm))) if warm else None

        def on_epoch(epoch: int, total: int, row: dict[str, float]) -> None:
            logger.info("%s", training.describe_epoch(model, epoch, total, row))
            ui.update_progress(progress, 100.0 * (epoch - (total - total_epochs)) / total_epochs)
            checkpoints.epoch_done(epoch)
            # Another stage failed: stop here; the finished epochs stay for the next run.
            check_not_stopped(layout)

        with closing(checkpoints):
            result = training.train(
                model,
                out.folder,
                config=config,
                seed=seed,
                weights=weights,
                input_shape=(arrays.image_size, arrays.image_size, 3),
                images=partial(_training_data, layout, arrays),
                features=_cached_features(layout, arrays, features),
                start_dir=layout.resolve(start.dir) if start else None,
                warm=warm_from,
                on_epoch=on_epoch,
            )
        out.facts.update(
            **result.facts(model),
            # Which process trained it: the flow's own, or a Dask worker's.
            worker={"host": socket.gethostname(), "pid": os.getpid()},
            settings=settings,
            seed=seed,
            weights=weights,
            inputs=_input_keys(arrays, features, start),
        )
        if warm:  # what it started from, so a rerun on production's own data can start so too
            out.facts.update(
                warm_file=warm.model_file, warm_sha256=warm.sha256, warm_about=warm.about
            )
        (out.folder / "config.json").write_text(json.dumps(out.facts, indent=2, default=str))
    ui.update_progress(progress, 100.0)
    return out.record


def _logits_on_cached_features(
    layout: Layout,
    arrays: ArraysRecord,
    features: FeaturesRecord,
    model: Any,
    x_test: Any,
    purpose: str,
) -> tuple[Any, dict[str, Any]] | None:
    """A frozen-base model's logits on the test images `x_test` from its base's features,
    computed only for test images no run has embedded (the same pieces as the training
    features'), and the facts that say so; None when the saved model's base does not compute
    the cached features."""
    from catdog.data.images import split_keys
    from catdog.evaluation import predict_logits, same_base
    from catdog.features import (
        FeatureSet,
        base_digest,
        base_of_pieces,
        built_extractor,
        features_of,
    )
    from catdog.models import classifier, feature_extractor
    from catdog.pieces import PieceStore

    if not features.pieces:
        return None
    extractor = feature_extractor(model)
    store = PieceStore(layout.resolve(features.pieces[0]), HashMemo(layout.hash_memo))
    digest = base_digest(extractor)
    # A base with the weights of the one that computed the pieces computes them: no need to
    # run it to check (which traces it, a second or two). Otherwise its features of a few
    # images are compared with the cached ones.
    base_check = "weights"
    if digest != base_of_pieces(store):
        base_check = "features"
        x_val, _ = load_arrays(layout, arrays, "validation")
        cached = FeatureSet.load(layout.resolve(features.dir), len(arrays.classes)).val
        if not same_base(extractor, x_val, cached):
            return None
    keys = split_keys(layout.resolve(arrays.dir), "test")
    embedder = built_extractor(digest) or extractor  # this run's, already traced, if built
    test_features, reuse = features_of(x_test, keys, embedder, store, purpose)
    facts = {
        "per_image": reuse.to_json(),
        "pieces": [layout.relative(store.folder)],
        "base_check": base_check,
    }
    return predict_logits(classifier(model), test_features, batch_size=1024), facts


@stage_task("evaluate")
def evaluate_model(
    model: str,
    trained: TrainedRecord,
    arrays: ArraysRecord,
    counts: CountsRecord,
    artifacts: str,
    features: FeaturesRecord | None = None,
) -> EvaluationRecord:
    """Score a trained model on the test split: accuracy, loss, confusion matrix, errors. A
    model whose head trained on cached `features` is scored on its base's cached features of
    the test images, so that a rerun embeds only the test images it has not seen."""
    import numpy as np

    from catdog.evaluation import load_model, predict_logits, score, softmax
    from catdog.plots import evaluation_figures, save_figure

    layout = Layout.at(artifacts)
    logger = get_run_logger()
    with stage_output(layout, model) as out:
        classes = list(arrays.classes)
        x_test, y_test = load_arrays(layout, arrays, "test")
        loaded = load_model(layout.resolve(trained.dir) / MODEL_FILE)
        on_features = None
        if features is not None:
            purpose = f"evaluate_model ({model})"
            on_features = _logits_on_cached_features(
                layout, arrays, features, loaded, x_test, purpose
            )
            if on_features is None:
                logger.warning(
                    "%s: its base does not compute the cached features; scoring it on the "
                    "test images instead",
                    model,
                )
        if on_features is not None:
            logits, facts = on_features
            out.facts.update(facts)
        else:
            logits = predict_logits(loaded, x_test)
        metrics = score(logits, y_test, classes)
        # What its exports must reproduce, image by image, before it can ship.
        np.save(out.folder / PROBABILITIES_FILE, softmax(logits).astype(np.float32))
        baseline = counts.baseline["validation"]
        figures = evaluation_figures(
            model, trained.history, baseline, metrics, x_test, y_test, classes
        )
        for file_name, figure in figures.items():
            save_figure(figure, out.folder / file_name)
        # Predictions stay (the promotion gate compares them with production's, image by
        # image); the per-image confidences and the error ranking are only for the figures.
        out.facts.update(
            model=model,
            **{field: metrics[field] for field in EVALUATION_FIELDS},
        )
    logger.info(
        "%s: test accuracy %.3f, test loss %.3f", model, metrics["accuracy"], metrics["loss"]
    )
    return out.record


EVALUATION_FIELDS = (
    "accuracy",
    "loss",
    "macro_f1",
    "per_class",
    "confusion_matrix",
    "predictions",
)
