"""Training: seeded, resumable after a crash, with per-epoch history and timings on disk.

`train` trains a model the way its catalog entry says: end to end on decoded uint8 arrays;
a head on cached frozen-base features (the same computation as running the frozen base every
epoch, without repeating it); or on from another model's trained weights (fine-tuning).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypedDict

import keras
import numpy as np
import tensorflow as tf

from catdog import catalog, models
from catdog.arrays import Rows
from catdog.config import TrainConfig
from catdog.errors import ModelError
from catdog.evaluation import remember_saved
from catdog.features import FeatureSet
from catdog.layout import FINAL_MODEL_FILE, HISTORY_ROWS_FILE, MODEL_FILE
from catdog.warm import WarmStart

logger = logging.getLogger(__name__)

HISTORY_KEYS = ("accuracy", "val_accuracy", "loss", "val_loss")
BEST_HEAD_FILE = "best-head.keras"  # a frozen-base model's best head so far, while the head trains
EpochHook = Callable[[int, int, dict[str, float]], None]  # (epoch done, total, metrics)


@dataclass
class TrainingData:
    x_train: Rows  # uint8 (n, h, w, 3), read from disk a batch at a time
    y_train: np.ndarray  # int32 (n,)
    x_val: Rows
    y_val: np.ndarray
    num_classes: int


class TrainedFacts(TypedDict):
    """What a training tells its stage's record (fields of `catdog.stage_records.TrainedRecord`)."""

    model: str
    epochs: int
    history: dict[str, list[float]]
    epoch_seconds: list[float]
    best_epoch: int
    saved_from: str
    replicas: int
    trainable_params: int
    total_params: int
    warm_start: str | None


@dataclass
class TrainResult:
    history: dict[str, list[float]]
    epoch_seconds: list[float]
    best_epoch: int  # 1-based, by validation accuracy
    trainable_params: int
    total_params: int
    saved_from: str | None = None  # whose weights model.keras holds, when not this model's
    replicas: int = 1  # devices each batch was split over
    warm_start: str | None = None  # what it started from, when a warm start was asked for

    def facts(self, name: str) -> TrainedFacts:
        """What this training of model `name` tells its stage's record."""
        return TrainedFacts(
            model=name,
            epochs=len(self.epoch_seconds),
            history=self.history,
            epoch_seconds=self.epoch_seconds,
            best_epoch=self.best_epoch,
            saved_from=self.saved_from or name,
            replicas=self.replicas,
            trainable_params=self.trainable_params,
            total_params=self.total_params,
            warm_start=self.warm_start,
        )


def describe_epoch(name: str, epoch: int, total: int, row: dict[str, float]) -> str:
    """A finished epoch of model `name` in one line: its metrics (0 for one it lacks) and
    seconds."""
    return (
        f"{name} epoch {epoch}/{total}: accuracy {row.get('accuracy', 0):.3f}, "
        f"val_accuracy {row.get('val_accuracy', 0):.3f}, loss {row.get('loss', 0):.3f}, "
        f"val_loss {row.get('val_loss', 0):.3f} ({row['seconds']:.1f} s)"
    )


CPUINFO = Path("/proc/cpuinfo")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # a CPU that computes bfloat16 natively


def cpu_has_native_bf16() -> bool:
    """True when the CPU's flags (in `CPUINFO`) include AVX512-BF16 or AMX-BF16."""
    try:
        flags = set(CPUINFO.read_text().split())
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_precision(precision: str, model: str) -> str:
    """The Keras dtype policy for `precision` when training `model` on this machine.

    "auto" picks mixed_bfloat16 for the models whose catalog entry allows it, and only where
    bf16 is native (a GPU, or a CPU with AVX512-BF16 or AMX); float32 otherwise.
    """
    if precision != "auto":
        return precision
    if not catalog.spec(model).bfloat16:
        return "float32"
    if tf.config.list_physical_devices("GPU"):
        return "mixed_bfloat16"
    return "mixed_bfloat16" if cpu_has_native_bf16() else "float32"


@contextmanager
def dtype_policy(precision: str, model: str) -> Iterator[str]:
    """Build and train under `precision`'s policy, restoring the previous one afterwards."""
    previous = keras.mixed_precision.global_policy()
    policy = resolve_precision(precision, model)
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield policy
    finally:
        keras.mixed_precision.set_global_policy(previous)


# Batches read in parallel and kept ready: fixed, not AUTOTUNE, whose prefetch buffers may grow
# to half the machine's memory; a few batches ahead keep the model fed.
READERS = 2
BATCHES_AHEAD = 2


def _options_without_autotune() -> tf.data.Options:
    """No autotuning: these pipelines fix their parallelism and buffers, and an autotuned
    iterator's tuning thread may sleep out its period (seconds) before the iterator can be
    destroyed. Keras drops each epoch's iterator as the next epoch starts, on the training
    thread: about one epoch in two would stand idle for 3-4 s at its first step."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


_WITHOUT_AUTOTUNE = _options_without_autotune()


def _index_batches(count: int, batch_size: int, *, shuffle: bool, seed: int) -> tf.data.Dataset:
    """The batches of row indices every pipeline here starts from (its options hold for the
    whole pipeline built on it)."""
    indices = tf.data.Dataset.range(count)
    if shuffle:
        # The same order as shuffling the examples themselves with this seed: a shuffle's
        # order depends on its seed and the number of elements, not on what they hold.
        indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    return indices.batch(batch_size).with_options(_WITHOUT_AUTOTUNE)


def _read_rows(
    rows: Rows, labels: np.ndarray, batch: tf.Tensor, label_index: tf.Tensor | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Rows `batch` of `rows` (read from disk by a numpy call) and their labels."""
    dtype = tf.as_dtype(rows.dtype)

    def read(row_index: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(rows[row_index]), np.asarray(labels[which], dtype=np.int32)

    values, targets = tf.numpy_function(
        read, [batch, batch if label_index is None else label_index], (dtype, tf.int32)
    )
    values = tf.ensure_shape(values, (None, *rows.shape[1:]))
    return values, tf.ensure_shape(targets, (None,))


def image_dataset(
    x: Rows, y: np.ndarray, batch_size: int, *, shuffle: bool, seed: int
) -> tf.data.Dataset:
    """Batches of float32 images, read from disk at each step and reshuffled every epoch.

    Only the batches in flight are in memory, however large the split: memory depends on the
    batch size and the model, not on the number of images.
    """

    def load(batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        images, labels = _read_rows(x, y, batch)
        return tf.cast(images, tf.float32), labels

    batches = _index_batches(len(x), batch_size, shuffle=shuffle, seed=seed)
    dataset = batches.map(load, num_parallel_calls=READERS, deterministic=True)
    return dataset.prefetch(BATCHES_AHEAD)


def feature_dataset(
    features: FeatureSet, batch_size: int, *, seed: int
) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """(train, validation) batches of cached features, read from disk at each step.

    Each epoch draws, for every training image, one of its cached views at random.
    """
    n_train, views = len(features.y_train), features.views

    def one_view(batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        view = tf.random.uniform(tf.shape(batch), 0, views, dtype=tf.int64)
        return _read_rows(features.train, features.y_train, view * n_train + batch, batch)

    train = _index_batches(n_train, batch_size, shuffle=True, seed=seed).map(one_view)
    val = _index_batches(len(features.y_val), 256, shuffle=False, seed=seed).map(
        lambda batch: _read_rows(features.val, features.y_val, batch)
    )
    return train.prefetch(BATCHES_AHEAD), val.prefetch(BATCHES_AHEAD)


class EpochLog(keras.callbacks.Callback):
    """Keeps the full history on disk, one row per finished epoch, across restarts.

    Keras's own History only knows the epochs of the current process; after a resume we
    still want epochs 1..N. Rows are keyed by epoch, so a repeated epoch overwrites itself.
    The best epoch by validation accuracy is saved (as `model.keras`, the model the pipeline
    evaluates and promotes, like Keras's `restore_best_weights`), judged against every row on
    disk and `best_before` (what the file already holds when training continues another
    model), so a restart cannot overwrite it with a worse epoch.
    """

    def __init__(
        self,
        path: Path,
        total_epochs: int,
        on_epoch: EpochHook | None,
        best_path: Path | None,
        best_before: float = -1.0,
    ) -> None:
        super().__init__()
        self.path = path
        self.total_epochs = total_epochs
        self.on_epoch = on_epoch
        self.best_path = best_path
        self.best_before = best_before
        self._started = 0.0

    def rows(self) -> dict[int, dict[str, float]]:
        if not self.path.is_file():
            return {}
        return {int(k): v for k, v in json.loads(self.path.read_text()).items()}

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        row = {key: float(value) for key, value in (logs or {}).items()}
        row["seconds"] = time.perf_counter() - self._started
        row["finished_at"] = time.time()  # when, to line epochs up with other events
        rows = self.rows()
        best_so_far = max(
            (r.get("val_accuracy", -1.0) for r in rows.values()), default=self.best_before
        )
        best_so_far = max(best_so_far, self.best_before)
        if self.best_path and row.get("val_accuracy", 0.0) > best_so_far:
            self.model.save(self.best_path)
        rows[epoch + 1] = row
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(self.path)
        if self.on_epoch:
            self.on_epoch(epoch + 1, self.total_epochs, row)


def history_from_rows(rows: dict[int, dict[str, float]]) -> tuple[dict[str, list[float]], list]:
    """Split per-epoch rows into Keras-style history lists and epoch durations."""
    ordered = [rows[epoch] for epoch in sorted(rows)]
    history = {key: [row[key] for row in ordered] for key in HISTORY_KEYS}
    return history, [row["seconds"] for row in ordered]


def fit_resumable(
    model: keras.Model,
    train: tf.data.Dataset,
    val: tf.data.Dataset,
    *,
    epochs: int,
    work_dir: Path,
    phase: str,
    on_epoch: EpochHook | None,
    best_path: Path | None,
    initial_epoch: int = 0,
    best_before: float = -1.0,
) -> dict[int, dict[str, float]]:
    """`model.fit` that continues from the last finished epoch if a previous try died.

    Returns every finished epoch's metrics, keyed by 1-based epoch number.
    """
    final_epoch = initial_epoch + epochs
    log = EpochLog(work_dir / f"{phase}-epochs.json", final_epoch, on_epoch, best_path, best_before)
    done = [epoch for epoch in log.rows() if epoch > initial_epoch]
    if done:
        logger.info("resuming %s at epoch %d of %d", phase, max(done) + 1, final_epoch)
    callbacks = [
        keras.callbacks.BackupAndRestore(str(work_dir / f"{phase}-backup")),
        log,
        keras.callbacks.TensorBoard(str(work_dir / "tensorboard" / phase), write_graph=False),
    ]
    model.fit(
        train,
        validation_data=val,
        epochs=final_epoch,
        initial_epoch=initial_epoch,
        callbacks=callbacks,
        shuffle=False,  # the dataset reshuffles itself every epoch
        verbose=2,
    )
    shutil.rmtree(work_dir / f"{phase}-backup", ignore_errors=True)
    return log.rows()


def count_params(model: keras.Model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    total = trainable + sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return trainable, total


def _result(model: keras.Model, rows: dict[int, dict[str, float]]) -> TrainResult:
    history, seconds = history_from_rows(rows)
    trainable, total = count_params(model)
    # The first epoch of the highest validation accuracy: the one EpochLog saved, as it saves
    # only on a strict improvement (over the starting model's epochs too, for fine-tuning).
    best = int(np.argmax(history["val_accuracy"])) + 1 if history["val_accuracy"] else 0
    return TrainResult(history, seconds, best, trainable, total)


def train_end_to_end(
    name: str,
    data: TrainingData,
    work_dir: Path,
    *,
    config: TrainConfig,
    seed: int,
    weights: str | None = None,
    warm: WarmStart | None = None,
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    """Train a model on images for `config.epochs`, from `warm`'s weights where they fit.

    Writes `model.keras` (the epoch with the best validation accuracy) and `final.keras`
    (the last epoch).
    """
    models.seed_everything(seed)
    with dtype_policy(config.precision, name) as policy:
        model = models.build_model(
            name, data.x_train.shape[1:], data.num_classes, weights=weights, seed=seed
        )
    started = start_warm(name, model, warm) if warm else None
    logger.info("%s: training under the %s dtype policy", name, policy)
    steps = config.epochs * math.ceil(len(data.x_train) / config.batch_size)
    models.compile_model(
        model,
        config.learning_rate,
        decay_steps=steps if catalog.spec(name).cosine_decay else None,
    )
    train = image_dataset(data.x_train, data.y_train, config.batch_size, shuffle=True, seed=seed)
    val = image_dataset(data.x_val, data.y_val, config.batch_size, shuffle=False, seed=seed)
    rows = fit_resumable(
        model,
        train,
        val,
        epochs=config.epochs,
        work_dir=work_dir,
        phase="train",
        on_epoch=on_epoch,
        best_path=work_dir / MODEL_FILE,
    )
    model.save(work_dir / FINAL_MODEL_FILE)
    return replace(_result(model, rows), warm_start=started)


# A step of the head is one small matmul, and Keras's overhead per step was most of its time:
# 32 steps per call gave the same history, bit for bit, with epochs of 0.7 s against 1.7 s
# (28,500 feature rows, batch 32, 2-core Xeon).
HEAD_STEPS_PER_CALL = 32


def train_head_on_features(
    name: str,
    features: FeatureSet,
    work_dir: Path,
    *,
    config: TrainConfig,
    seed: int,
    weights: str | None,
    input_shape: tuple[int, int, int],
    warm: WarmStart | None = None,
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    """Train a frozen-base model's head on cached base features, then assemble the full model.

    Each epoch draws, for every training image, one of its cached augmented views, so the
    head sees augmentation as it would through the frozen base, at a fraction of the cost. A
    warm start starts the head from `warm`'s head (the base is the same frozen one).
    """
    models.seed_everything(seed)
    head = models.make_head(features.dim, features.num_classes, dropout=config.dropout, seed=seed)
    started = start_warm(name, head, warm, head_only=True) if warm else None
    models.compile_model(head, config.learning_rate, steps_per_execution=HEAD_STEPS_PER_CALL)
    train, val = feature_dataset(features, config.batch_size, seed=seed)
    rows = fit_resumable(
        head,
        train,
        val,
        epochs=config.epochs,
        work_dir=work_dir,
        phase="head",
        on_epoch=on_epoch,
        best_path=work_dir / BEST_HEAD_FILE,
    )
    model = models.build_model(
        name,
        input_shape,
        features.num_classes,
        weights=weights,
        seed=seed,
        dropout=config.dropout,
    )
    models.transplant_head(head, model)
    model.save(work_dir / FINAL_MODEL_FILE)
    best_head = keras.models.load_model(work_dir / BEST_HEAD_FILE, safe_mode=True)
    models.transplant_head(best_head, model)
    model.save(work_dir / MODEL_FILE)
    remember_saved(model, work_dir / MODEL_FILE)
    (work_dir / BEST_HEAD_FILE).unlink()
    return replace(_result(model, rows), warm_start=started)


def fine_tune(
    name: str,
    start_model: Path,
    start_history: dict[int, dict[str, float]],
    data: TrainingData,
    work_dir: Path,
    *,
    config: TrainConfig,
    seed: int,
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    """Unfreeze the top of a trained frozen-base model and train on at a lower rate.

    The history continues the starting model's epochs, as in the TensorFlow tutorial. The
    shipped `model.keras` is the best fine-tuning epoch by validation accuracy, or the starting
    model itself when no fine-tuning epoch beats it; either way `best_epoch` names that epoch
    in the continued history.
    """
    models.seed_everything(seed)
    trained = keras.models.load_model(start_model, safe_mode=True)
    best_path = work_dir / MODEL_FILE
    if not best_path.exists():  # a resumed run keeps what it saved before
        shutil.copyfile(start_model, best_path)
    start_best = max((row["val_accuracy"] for row in start_history.values()), default=-1.0)
    with dtype_policy(config.precision, name) as policy:
        # Rebuilt (no download: weights=None) so that the policy applies to every layer.
        model = models.build_model(
            name,
            data.x_train.shape[1:],
            data.num_classes,
            weights=None,
            seed=seed,
            dropout=config.dropout,
        )
    model.set_weights(trained.get_weights())
    logger.info("%s: fine-tuning under the %s dtype policy", name, policy)
    models.unfreeze_top(model, config.finetune_at)
    models.compile_model(model, config.finetune_learning_rate)
    train = image_dataset(data.x_train, data.y_train, config.batch_size, shuffle=True, seed=seed)
    val = image_dataset(data.x_val, data.y_val, config.batch_size, shuffle=False, seed=seed)
    first = len(start_history)
    rows = fit_resumable(
        model,
        train,
        val,
        epochs=config.finetune_epochs,
        work_dir=work_dir,
        phase="finetune",
        on_epoch=on_epoch,
        best_path=best_path,
        initial_epoch=first,
        best_before=start_best,
    )
    model.save(work_dir / FINAL_MODEL_FILE)
    result = _result(model, {**start_history, **rows})
    # Which model's weights `model.keras` holds: this one's, or the start's if fine-tuning
    # never beat it.
    result.saved_from = trained.name if result.best_epoch <= first else name
    if result.saved_from != name:
        logger.info(
            "%s: no fine-tuning epoch beat %s; it ships %s's weights",
            name,
            trained.name,
            trained.name,
        )
    return result


def start_warm(name: str, model: keras.Model, warm: WarmStart, head_only: bool = False) -> str:
    """Give `model` the weights of `warm`'s model (its head's, `head_only`) where every one
    fits, shape by shape; else leave it as built. Says which, for the record and the log."""
    try:
        source = keras.models.load_model(warm.model_file, safe_mode=True, compile=False)
    except (OSError, ValueError) as error:
        return _cold(name, warm, f"its model file cannot be loaded ({error})")
    if head_only:
        try:
            models.transplant_head(source, model)
        except ModelError as misfit:
            return _cold(name, warm, str(misfit))
    else:
        theirs = [tuple(weight.shape) for weight in source.get_weights()]
        ours = [tuple(weight.shape) for weight in model.get_weights()]
        if theirs != ours:
            misfit = next(
                (f"{a} against {b}" for a, b in zip(theirs, ours, strict=False) if a != b),
                f"{len(theirs)} weights against {len(ours)}",
            )
            return _cold(name, warm, f"its weights do not fit this model's ({misfit})")
        model.set_weights(source.get_weights())
    logger.info("%s: warm-started from %s", name, warm.about)
    return f"warm-started from {warm.about}"


def _cold(name: str, warm: WarmStart, why: str) -> str:
    logger.warning("%s: started cold, not from %s: %s", name, warm.about, why)
    return f"started cold, not from {warm.about}: {why}"


def distribution_strategy(name: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy called `name` ("default" or "mirrored").

    Mirrored replicates the model on every visible GPU or, on a machine without one, on every
    logical CPU device (one unless configured otherwise, as the tests do to try it on a CPU).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name != "mirrored":
        raise ModelError(f"strategy {name!r}: expected default or mirrored")
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy(devices=[device.name for device in devices])


def train(
    name: str,
    work_dir: Path,
    *,
    config: TrainConfig,
    seed: int,
    weights: str | None,
    input_shape: tuple[int, int, int],
    images: Callable[[], TrainingData],
    features: Callable[[], FeatureSet] | None = None,
    start_dir: Path | None = None,
    warm: WarmStart | None = None,
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    """Train model `name` the way its catalog entry says, into `work_dir`.

    A model that starts from another continues from that model's `model.keras` and history in
    `start_dir`; one that trains on features trains its head on `features()`; any other trains
    end to end on `images()`. The image arrays are loaded only when needed (a head on 224x224
    features would hold about 0.4 GiB of images for nothing). Writes `model.keras`,
    `final.keras` and `history-rows.json` (every epoch's metrics and seconds).

    Raises:
        ModelError: Unknown model, or one the catalog says trains from another model or from
            features without `start_dir` or `features`.
    """
    # A process may train several models (a Dask worker does, after other tasks): drop what
    # Keras holds of the earlier ones (memory, layer names) before the next.
    models.clear_keras_session()
    strategy = distribution_strategy(config.strategy)
    with strategy.scope():
        entry = catalog.spec(name)
        if entry.starts_from:
            if start_dir is None:
                raise ModelError(
                    f"{name} starts from {entry.starts_from}: pass its training folder"
                )
            start_rows = json.loads((start_dir / HISTORY_ROWS_FILE).read_text())
            result = fine_tune(
                name,
                start_dir / MODEL_FILE,
                {int(epoch): row for epoch, row in start_rows.items()},
                images(),
                work_dir,
                config=config,
                seed=seed,
                on_epoch=on_epoch,
            )
        elif entry.trains_on_features:
            if features is None:
                raise ModelError(f"{name} trains on cached base features: pass them")
            result = train_head_on_features(
                name,
                features(),
                work_dir,
                config=config,
                seed=seed,
                weights=weights,
                input_shape=input_shape,
                warm=warm,
                on_epoch=on_epoch,
            )
        else:
            result = train_end_to_end(
                name,
                images(),
                work_dir,
                config=config,
                seed=seed,
                weights=weights,
                warm=warm,
                on_epoch=on_epoch,
            )
    result.replicas = strategy.num_replicas_in_sync
    (work_dir / HISTORY_ROWS_FILE).write_text(json.dumps(history_rows(result), indent=1))
    return result


def history_rows(result: TrainResult) -> dict[str, dict[str, float]]:
    """Per-epoch metrics and seconds keyed by 1-based epoch, as `history-rows.json` holds them."""
    return {
        str(i + 1): {
            **{key: values[i] for key, values in result.history.items()},
            "seconds": result.epoch_seconds[i],
        }
        for i in range(len(result.epoch_seconds))
    }
