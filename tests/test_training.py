"""Training on small random data: resume after a crash, frozen-base head, fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from catdog.config import TrainConfig
from catdog.errors import ModelError
from catdog.features import TRAIN_FILE, extract_features, unaugmented_train_features
from catdog.training import (
    TrainingData,
    TrainResult,
    describe_epoch,
    dtype_policy,
    resolve_precision,
    train,
    train_end_to_end,
)

pytestmark = pytest.mark.slow  # trains with TensorFlow


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu sse2 avx2 fma", False),  # AVX2 only
        ("fpu avx2 avx512f avx512bw avx512_vnni", False),  # AVX-512 without bf16
        ("fpu avx2 avx512f avx512_bf16", True),
        ("fpu avx2 avx512f amx_tile amx_bf16 amx_int8", True),
        (None, False),  # no /proc/cpuinfo (not Linux)
    ],
)
@pytest.mark.parametrize("model", ["model1", "model2", "model3", "model4", "model4_finetune"])
def test_auto_precision_is_bf16_only_where_measured_equal_and_native(
    model, flags, native, tmp_path, monkeypatch
):
    from catdog import training

    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    monkeypatch.setattr(training, "CPUINFO", cpuinfo)
    # model4's head trains on float32 features; the others measured equal under bf16.
    measured_equal = model in ("model1", "model2", "model3", "model4_finetune")
    expected = "mixed_bfloat16" if native and measured_equal else "float32"
    assert resolve_precision("auto", model) == expected  # this suite never sees a GPU
    for explicit in ("float32", "mixed_bfloat16"):
        assert resolve_precision(explicit, model) == explicit


def test_the_input_pipelines_tune_nothing():
    """Keras drops an epoch's iterator as the next epoch starts: an autotuned one kept its
    tuning thread's wait first, and about one epoch in two of model1-model3 stood idle for 3-4 s
    (`bench/RESULTS.md`, cold-flow-20-epochs-split). Whether an iterator stalls depends on
    where that thread's period stands, so this checks the setting the fix rests on."""
    from catdog.features import FeatureSet
    from catdog.training import feature_dataset, image_dataset

    pixels, labels = np.zeros((64, 8, 8, 3), np.uint8), np.zeros(64, np.int64)
    features = FeatureSet(
        np.zeros((64, 4), np.float32), labels, np.zeros((8, 4), np.float32), labels[:8], 2
    )
    pipelines = [
        image_dataset(pixels, labels, 8, shuffle=True, seed=1),
        image_dataset(pixels, labels, 8, shuffle=False, seed=1),
        *feature_dataset(features, 8, seed=1),
    ]
    assert [pipeline.options().autotune.enabled for pipeline in pipelines] == [False] * 4


def test_dtype_policy_restores_the_previous_policy():
    import keras

    before = keras.mixed_precision.global_policy().name
    with dtype_policy("mixed_bfloat16", "model2") as policy:
        assert policy == "mixed_bfloat16"
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == before


def test_a_training_tells_its_record_what_it_did_and_each_epoch_is_one_line():
    result = TrainResult({"accuracy": [0.5, 0.75]}, [1.5, 1.25], 2, 10, 30, replicas=2)
    assert result.facts("model1") == {
        "model": "model1",
        "epochs": 2,
        "history": {"accuracy": [0.5, 0.75]},
        "epoch_seconds": [1.5, 1.25],
        "best_epoch": 2,
        "saved_from": "model1",  # its own weights
        "replicas": 2,
        "trainable_params": 10,
        "total_params": 30,
        "warm_start": None,  # none was asked for
    }
    result.saved_from = "model4"
    assert result.facts("model4_finetune")["saved_from"] == "model4"
    row = {"accuracy": 0.5, "val_accuracy": 0.25, "loss": 0.6931, "seconds": 12.34}
    assert describe_epoch("model1", 3, 10, row) == (
        "model1 epoch 3/10: accuracy 0.500, val_accuracy 0.250, loss 0.693, val_loss 0.000 (12.3 s)"
    )


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def data() -> TrainingData:
    rng = np.random.default_rng(0)
    y_train = np.array([0, 1] * 12, dtype=np.int32)
    y_val = np.array([0, 1] * 4, dtype=np.int32)
    # Brightness tells the classes apart, so a few epochs learn something.
    x_train = rng.integers(0, 60, (24, 32, 32, 3)) + 150 * y_train[:, None, None, None]
    x_val = rng.integers(0, 60, (8, 32, 32, 3)) + 150 * y_val[:, None, None, None]
    return TrainingData(x_train.astype(np.uint8), y_train, x_val.astype(np.uint8), y_val, 2)


def test_training_killed_after_epoch_2_of_4_resumes_at_epoch_3(data, tmp_path):
    config = TrainConfig(epochs=4, batch_size=8)
    seen: list[int] = []

    def crash_after_second(epoch: int, total: int, row: dict) -> None:
        seen.append(epoch)
        if epoch == 2:
            raise Crash("killed")

    with pytest.raises(Crash):
        train_end_to_end(
            "model1", data, tmp_path, config=config, seed=1, on_epoch=crash_after_second
        )
    assert seen == [1, 2]
    assert not (tmp_path / "final.keras").exists()

    resumed: list[int] = []
    result = train_end_to_end(
        "model1",
        data,
        tmp_path,
        config=config,
        seed=1,
        on_epoch=lambda epoch, total, row: resumed.append(epoch),
    )
    assert resumed == [3, 4]
    assert len(result.history["val_accuracy"]) == 4
    assert len(result.epoch_seconds) == 4
    assert (tmp_path / "model.keras").is_file()
    assert (tmp_path / "final.keras").is_file()
    assert 1 <= result.best_epoch <= 4
    assert not (tmp_path / "train-backup").exists()


def pieces_for(data, tmp_path: Path) -> dict:
    """Content keys for the test images (distinct per row) and a piece store per view."""
    from catdog.pieces import PieceStore

    return {
        "train_keys": [f"train-{i}" for i in range(len(data.y_train))],
        "val_keys": [f"val-{i}" for i in range(len(data.y_val))],
        "pieces": lambda view: PieceStore(tmp_path / "pieces" / str(view)),
    }


def three_view_features(data, tmp_path: Path):
    """model4's base features (random weights) of the test images, three views each."""
    return extract_features(
        data.x_train,
        data.y_train,
        data.x_val,
        data.y_val,
        tmp_path / "features",
        model_name="model4",
        num_classes=2,
        weights=None,
        views=3,
        seed=3,
        **pieces_for(data, tmp_path),
    )


def test_head_on_cached_features_then_fine_tune(data, tmp_path):
    config = TrainConfig(epochs=2, batch_size=8, finetune_epochs=1, feature_views=3)
    features, reuse = three_view_features(data, tmp_path)
    assert reuse.to_json() == {"computed": 3 * 24 + len(data.y_val), "reused": 0}
    on_disk = np.load(tmp_path / "features" / TRAIN_FILE)
    assert on_disk.shape == (3, 24, 1280)
    as_they_are, labels = unaugmented_train_features(tmp_path / "features")
    np.testing.assert_array_equal(as_they_are, on_disk[0])
    np.testing.assert_array_equal(labels, data.y_train)
    assert features.train.shape == (3 * 24, 1280) and features.views == 3
    assert features.val.shape == (8, 1280)
    # Row v * n + i of the reader is view v of image i.
    np.testing.assert_array_equal(features.train[24 + 5], on_disk[1, 5])
    # The mirror view differs from the plain one: augmentation reaches the features.
    assert not np.allclose(on_disk[0], on_disk[1], rtol=1e-3, atol=0)

    def no_images() -> TrainingData:
        raise AssertionError("a head on cached features must not load the images")

    head_dir = tmp_path / "model4"
    head_dir.mkdir()
    result = train(
        "model4",
        head_dir,
        config=config,
        seed=3,
        weights=None,
        input_shape=(32, 32, 3),
        images=no_images,
        features=lambda: features,
    )
    assert result.trainable_params == 1280 * 2 + 2
    assert len(result.history["accuracy"]) == 2
    assert (head_dir / "model.keras").is_file() and (head_dir / "final.keras").is_file()
    assert (head_dir / "history-rows.json").is_file()

    with pytest.raises(ModelError, match="starts from model4"):
        train(
            "model4_finetune",
            tmp_path / "nowhere",
            config=config,
            seed=3,
            weights=None,
            input_shape=(32, 32, 3),
            images=lambda: data,
        )
    # The head's second epoch scored more than any epoch can: fine-tuning never beats it, so
    # the fine-tuned model ships the head's weights (and says so).
    rows_file = head_dir / "history-rows.json"
    rows = json.loads(rows_file.read_text())
    rows["2"]["val_accuracy"] = 1.01
    rows_file.write_text(json.dumps(rows))
    tuned_dir = tmp_path / "finetune"
    tuned_dir.mkdir()
    tuned = train(
        "model4_finetune",
        tuned_dir,
        config=config,
        seed=3,
        weights=None,
        input_shape=(32, 32, 3),
        images=lambda: data,
        start_dir=head_dir,
    )
    assert len(tuned.history["val_accuracy"]) == 3  # 2 head epochs + 1 fine-tuning epoch
    assert tuned.trainable_params > result.trainable_params
    assert tuned.best_epoch == 2 and tuned.saved_from == "model4"
    assert (tuned_dir / "model.keras").read_bytes() == (head_dir / "model.keras").read_bytes()
    assert (tuned_dir / "final.keras").read_bytes() != (head_dir / "model.keras").read_bytes()


def test_a_head_trains_alike_whether_its_seed_was_set_before_or_not(data, tmp_path):
    """Training seeds without resetting an unchanged TensorFlow seed (which would clear the
    process's kernels); the epochs, views and dropout drawn are those of a fresh seeding."""
    import random

    import keras
    import tensorflow as tf

    config = TrainConfig(epochs=3, batch_size=8, feature_views=3, dropout=0.5)
    features, _ = three_view_features(data, tmp_path)

    def head_history(name: str) -> dict:
        folder = tmp_path / name
        folder.mkdir()
        result = train(
            "model4",
            folder,
            config=config,
            seed=3,
            weights=None,
            input_shape=(32, 32, 3),
            images=lambda: data,
            features=lambda: features,
        )
        return result.history

    keras.utils.set_random_seed(11)  # another seed: training sets all of them afresh
    fresh = head_history("fresh")
    # Its own seed already set, and every stream drawn from since.
    keras.utils.set_random_seed(3)
    random.random(), np.random.rand(), tf.random.uniform(()), keras.random.uniform(())
    list(tf.data.Dataset.range(8).shuffle(8).map(lambda i: tf.random.uniform(())).take(2))
    again = head_history("again")
    assert again == fresh
    assert len(set(fresh["accuracy"])) > 1 or len(set(fresh["loss"])) > 1


MIRRORED_RUN = """
import json, sys
import numpy as np
import tensorflow as tf

# Two logical CPU devices stand in for two GPUs; set before TensorFlow initializes.
(cpu,) = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)
from pathlib import Path
from catdog.config import TrainConfig
from catdog.training import TrainingData, train

rng = np.random.default_rng(0)
y = np.array([0, 1] * 8, dtype=np.int32)
x = (rng.integers(0, 60, (16, 32, 32, 3)) + 150 * y[:, None, None, None]).astype(np.uint8)
result = train(
    sys.argv[1],
    Path(sys.argv[2]),
    config=TrainConfig(epochs=2, batch_size=8, strategy="mirrored"),
    seed=1,
    weights=None,
    input_shape=(32, 32, 3),
    images=lambda: TrainingData(x, y, x[:8], y[:8], 2),
)
print(json.dumps({"replicas": result.replicas, "epochs": len(result.epoch_seconds)}))
"""


def test_mirrored_strategy_trains_one_model_over_two_devices(tmp_path):
    model = "model2"  # batch normalization and random augmentation layers, under replicas
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", MIRRORED_RUN, model, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == {"replicas": 2, "epochs": 2}
    assert (tmp_path / "model.keras").is_file() and (tmp_path / "final.keras").is_file()


def _trainable(model_file) -> list[np.ndarray]:
    import keras

    model = keras.models.load_model(model_file, safe_mode=True, compile=False)
    return [np.asarray(weight) for weight in model.trainable_weights]


def test_a_warm_start_begins_from_the_weights_it_is_given_where_they_fit(data, tmp_path):
    """At a learning rate of 0 an epoch changes no trainable weight: a warm-started model ends
    where its start was. A start whose weights do not fit (three classes, not two) is not
    loaded: the model starts cold and says why."""
    from catdog.warm import WarmStart

    source = tmp_path / "production"
    train_end_to_end("model1", data, source, config=TrainConfig(epochs=1, batch_size=8), seed=1)
    warm = WarmStart(str(source / "model.keras"), "0" * 64, "production (model1, epoch 1)")
    still = TrainConfig(epochs=1, batch_size=8, learning_rate=0.0)
    result = train_end_to_end("model1", data, tmp_path / "warm", config=still, seed=2, warm=warm)
    assert result.warm_start == "warm-started from production (model1, epoch 1)"
    for started, ended in zip(
        _trainable(source / "model.keras"),
        _trainable(tmp_path / "warm" / "final.keras"),
        strict=True,
    ):
        np.testing.assert_array_equal(started, ended)

    three = TrainingData(data.x_train, data.y_train % 3, data.x_val, data.y_val, 3)
    cold = train_end_to_end("model1", three, tmp_path / "cold", config=still, seed=2, warm=warm)
    assert cold.warm_start is not None
    assert cold.warm_start.startswith("started cold, not from production (model1, epoch 1): ")
    assert "do not fit" in cold.warm_start
    cold_weights = _trainable(tmp_path / "cold" / "final.keras")
    assert not np.array_equal(cold_weights[0], _trainable(source / "model.keras")[0])


def test_a_warm_started_head_begins_from_the_production_models_head(data, tmp_path):
    """model4 trains its head on cached features: a warm start gives the head production's
    head weights (the frozen base is the same either way)."""
    import keras

    from catdog.models import HEAD_LAYER_NAME
    from catdog.warm import WarmStart

    features, _reuse = extract_features(
        *(data.x_train, data.y_train, data.x_val, data.y_val, tmp_path / "features"),
        model_name="model4",
        num_classes=2,
        weights=None,
        views=1,
        seed=3,
        **pieces_for(data, tmp_path),
    )
    options = {"seed": 3, "weights": None, "input_shape": (32, 32, 3), "images": None}
    source = tmp_path / "production"
    source.mkdir()
    train(
        "model4",
        source,
        config=TrainConfig(epochs=2, batch_size=8),
        features=lambda: features,
        **options,
    )
    warm = WarmStart(str(source / "model.keras"), "0" * 64, "production (model4, epoch 2)")
    still = TrainConfig(epochs=1, batch_size=8, learning_rate=0.0)
    (tmp_path / "warm").mkdir()
    result = train(
        "model4", tmp_path / "warm", config=still, features=lambda: features, warm=warm, **options
    )
    assert result.warm_start == "warm-started from production (model4, epoch 2)"

    def head(path) -> list[np.ndarray]:
        model = keras.models.load_model(path, safe_mode=True, compile=False)
        return model.get_layer(HEAD_LAYER_NAME).get_weights()

    for started, ended in zip(
        head(source / "model.keras"), head(tmp_path / "warm" / "final.keras"), strict=True
    ):
        np.testing.assert_array_equal(started, ended)
