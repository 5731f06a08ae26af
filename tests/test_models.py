"""The model registry: architectures, parameter counts, training, saving and weights errors."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras

from catdog import catalog, layers, models
from catdog.errors import ModelError, WeightsError
from catdog.evaluation import load_model, predict_logits, same_base
from catdog.features import base_digest
from tests.conftest import REAL_WEIGHTS

pytestmark = pytest.mark.slow  # trains with TensorFlow

SHAPE = (32, 32, 3)  # the smallest input MobileNetV2 accepts keeps every test fast
CLASSES = 2
MOBILENET_NO_TOP_FEATURES = 1280  # channels out of MobileNetV2's last conv (alpha 1.0)


def conv_params(kernel: int, c_in: int, c_out: int) -> int:
    return kernel * kernel * c_in * c_out + c_out  # weights + one bias per filter


def dense_params(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def model1_params(size: int, classes: int) -> int:
    """The blog CNN's parameter count from layer arithmetic ('valid' 3x3 convs, 2x2 pools)."""
    side = size - 2  # conv1
    side //= 2  # pool1
    side -= 2  # conv2
    side //= 2  # pool2
    side -= 2  # conv3
    flat = side * side * 64
    return (
        conv_params(3, 3, 32)
        + conv_params(3, 32, 32)
        + conv_params(3, 32, 64)
        + dense_params(flat, 64)
        + dense_params(64, 64)
        + dense_params(64, classes)
    )


def trainable_count(model: keras.Model) -> int:
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def random_images(n: int, shape=SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, size=(n, *shape)).astype("float32")
    y = rng.integers(0, CLASSES, size=n)
    return x, y


@pytest.fixture(scope="module")
def built() -> dict[str, keras.Model]:
    # Built once per module: MobileNetV2 takes about a second to build on CPU.
    keras.utils.set_random_seed(0)
    return {name: models.build_model(name, SHAPE, CLASSES, seed=0) for name in catalog.MODEL_NAMES}


@pytest.mark.parametrize("name", ["model1", "model3"])
@pytest.mark.parametrize("size", [32, 160])
def test_cnn_models_have_the_blogs_parameter_count(name, size):
    model = models.build_model(name, (size, size, 3), CLASSES, seed=0)
    assert model.name == name
    assert model.count_params() == model1_params(size, CLASSES)
    assert trainable_count(model) == model1_params(size, CLASSES)  # augmentation has none


@pytest.mark.parametrize(("size", "flat"), [(32, 2 * 2 * 64), (160, 18 * 18 * 64)])
def test_model2_is_augmentation_then_normalized_conv_blocks(size, flat):
    model = models.build_model("model2", (size, size, 3), CLASSES, seed=0)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == [
        "RandomFlipAndRotation",  # first, and no rescaling
        *["Conv2D", "MaxPooling2D", "FusedBatchNormalization"] * 3,
        "Flatten",
        "Dense",
        "Dropout",
        "Dense",
    ]
    convs = conv_params(3, 3, 32) + conv_params(3, 32, 32) + conv_params(3, 32, 64)
    norms = 2 * (32 + 32 + 64)  # gamma and beta train; the moving mean and variance do not
    assert trainable_count(model) == convs + norms + dense_params(flat, 64) + dense_params(64, 2)
    assert model.count_params() == trainable_count(model) + norms


def test_model1_is_the_blog_cnn_without_rescaling(built):
    kinds = [type(layer).__name__ for layer in built["model1"].layers]
    assert kinds == [
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "Flatten",
        "Dense",
        "Dense",
        "Dropout",
        "Dense",
    ]
    head = built["model1"].layers[-1]
    assert head.activation is keras.activations.linear  # logits, for from_logits=True


def test_model3_scales_like_mobilenet_preprocess_input(built):
    layer = built["model3"].get_layer(models.PREPROCESS_LAYER_NAME)
    x = np.array([[0.0, 127.5, 255.0]], dtype="float32")
    expected = keras.applications.mobilenet_v2.preprocess_input(x.copy())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["model4", "model4_finetune"])
def test_model4_trains_only_its_head(built, name):
    model = built[name]
    head = dense_params(MOBILENET_NO_TOP_FEATURES, CLASSES)
    assert trainable_count(model) == head
    assert models.get_base(model).trainable is False
    assert model.count_params() > head


def test_unfreeze_top_trains_base_layers_from_index():
    model = models.build_model("model4_finetune", SHAPE, CLASSES)
    models.unfreeze_top(model, fine_tune_at=100)
    base = models.get_base(model)
    assert len(base.layers) == 154  # as the TF tutorial's MobileNetV2
    assert not any(layer.trainable for layer in base.layers[:100])
    assert all(layer.trainable for layer in base.layers[100:])
    assert trainable_count(model) > dense_params(MOBILENET_NO_TOP_FEATURES, CLASSES)
    with pytest.raises(ModelError, match="fine_tune_at"):
        models.unfreeze_top(model, fine_tune_at=999)
    with pytest.raises(ModelError, match="no 'mobilenetv2_base'"):
        models.unfreeze_top(models.build_model("model1", SHAPE, CLASSES), 100)


def test_head_trained_on_features_transplants_into_model4():
    # The cached-features path: extract pooled base features, train a separate head on
    # them, copy it into model4; the full model must then give the head's logits.
    model = models.build_model("model4", SHAPE, CLASSES, seed=0)
    extractor = models.feature_extractor(model)
    x, y = random_images(8, seed=2)
    features = extractor.predict(x, verbose=0)
    assert features.shape == (8, MOBILENET_NO_TOP_FEATURES)
    head = models.compile_model(models.make_head(MOBILENET_NO_TOP_FEATURES, CLASSES, seed=0))
    head.fit(features, y, epochs=1, verbose=0)
    models.transplant_head(head, model)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), head.predict(features, verbose=0), rtol=1e-4, atol=1e-4
    )
    assert isinstance(models.get_augmentation(model), layers.RandomFlipAndRotation)
    with pytest.raises(ModelError, match="head"):
        models.transplant_head(models.make_head(MOBILENET_NO_TOP_FEATURES, 3), model)
    with pytest.raises(ModelError, match="augmentation"):
        models.get_augmentation(models.build_model("model1", SHAPE, CLASSES))


def test_a_frozen_base_model_is_scored_on_features_of_its_own_base_only(built):
    # evaluate_model scores model4 on cached base features: the classifier on them gives
    # the whole model's logits, and features of another base are refused.
    model = built["model4"]
    other = models.build_model("model4", SHAPE, CLASSES, seed=1)  # random, other weights
    x, _ = random_images(8, seed=3)
    features = models.feature_extractor(model).predict_on_batch(x)
    np.testing.assert_allclose(
        predict_logits(models.classifier(model), np.asarray(features)),
        model.predict_on_batch(x),
        rtol=1e-5,
        atol=1e-5,
    )
    assert same_base(models.feature_extractor(model), x, features)
    assert not same_base(models.feature_extractor(other), x, features)
    # Without running them: the digests of their weights.
    assert base_digest(models.feature_extractor(model)) == base_digest(model)
    assert base_digest(other) != base_digest(model)
    assert not same_base(models.feature_extractor(model), x[:0], features)
    with pytest.raises(ModelError, match="no 'mobilenetv2_base'"):
        models.classifier(built["model1"])


def test_a_random_base_is_drawn_from_the_seed_alone():
    # Other draws in the process (Prefect's threads make some) must not change it: the base
    # that computed model4's cached features is rebuilt to save the head trained on them.
    first = models.build_model("model4", SHAPE, CLASSES, weights=None, seed=3)
    random.random()
    np.random.default_rng().random()
    keras.random.uniform((4,))
    stop = threading.Event()

    def draw_meanwhile() -> None:
        while not stop.is_set():
            random.random()
            keras.random.uniform((1,))

    drawer = threading.Thread(target=draw_meanwhile)
    drawer.start()
    try:
        second = models.build_model("model4", SHAPE, CLASSES, weights=None, seed=3)
    finally:
        stop.set()
        drawer.join()
    pairs = zip(
        models.get_base(first).get_weights(), models.get_base(second).get_weights(), strict=True
    )
    assert all(np.array_equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("name", catalog.MODEL_NAMES)
def test_every_model_fits_and_predicts(built, name):
    model = models.compile_model(built[name])
    x, y = random_images(16)
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert model.predict(x[:5], verbose=0).shape == (5, CLASSES)


@pytest.mark.parametrize("name", catalog.MODEL_NAMES)
def test_keras_file_round_trip_in_safe_mode(built, name, tmp_path):
    model = built[name]
    x, _ = random_images(4, seed=1)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = load_model(path)
    # predict runs in inference mode: augmentation and dropout are identities.
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )
    if catalog.spec(name).frozen_base:
        assert trainable_count(loaded) == trainable_count(model)


def test_unknown_model_name():
    with pytest.raises(ModelError, match=r"unknown model 'model9'; choose from model1, model2"):
        models.build_model("model9", SHAPE, CLASSES)


def test_bad_shapes_and_class_counts():
    with pytest.raises(ModelError, match="at least 32x32"):
        models.build_model("model4", (16, 16, 3), CLASSES)
    with pytest.raises(ModelError, match="at least 2 classes"):
        models.build_model("model1", SHAPE, 1)


def test_bad_path_raises_weights_error(tmp_path):
    with pytest.raises(WeightsError, match=r"missing\.h5"):
        models.build_model("model4", SHAPE, CLASSES, weights=str(tmp_path / "missing.h5"))


def test_corrupt_weights_file_raises_weights_error(tmp_path):
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"not hdf5 at all")
    with pytest.raises(WeightsError, match=r"corrupt\.h5.* not an HDF5 file"):
        models.build_model("model4", SHAPE, CLASSES, weights=str(corrupt))


def test_failed_download_is_one_actionable_line(tmp_path):
    # Port 9 (discard) on loopback is closed: the connection is refused at once, with or
    # without internet, and the empty cache folder forces a download attempt.
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        models.fetch_imagenet_weights(160, cache_dir=tmp_path, base_url="http://127.0.0.1:9/")
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("could not download the ImageNet MobileNetV2 weights (")
    assert "--weights PATH or CATDOG_WEIGHTS" in message
    assert not list(tmp_path.rglob("*.h5"))  # no half-downloaded file left in the cache


def test_stalled_download_times_out(tmp_path):
    # A listening socket that never answers: the connect succeeds (kernel backlog) but no
    # byte ever comes back, as on a network that silently drops packets. urllib alone would
    # wait forever; the download timeout must turn it into a WeightsError.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(WeightsError, match="timed out"):
            models.fetch_imagenet_weights(
                96, cache_dir=tmp_path, base_url=f"http://127.0.0.1:{port}/", timeout=1.0
            )
        assert time.monotonic() - start < 10
    assert socket.getdefaulttimeout() is None  # the process-wide default is restored


def _keras_cache_has(fname: str) -> bool:
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    return (home / "models" / fname).exists() or (Path("/tmp/.keras/models") / fname).exists()


def _internet_reachable() -> bool:
    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=3).close()
    except OSError:
        return False
    return True


def test_imagenet_without_network_fails_fast_with_weights_hint():
    if _keras_cache_has(models.imagenet_weights_filename(SHAPE[0])):
        pytest.skip("ImageNet weights already cached; nothing would be downloaded")
    if _internet_reachable():
        pytest.skip("network reachable; this test checks the offline failure")
    start = time.monotonic()
    with pytest.raises(WeightsError, match="--weights"):
        models.build_model("model4", SHAPE, CLASSES, weights="imagenet")
    assert time.monotonic() - start < 30


@pytest.mark.skipif(not REAL_WEIGHTS.is_file(), reason="shared MobileNetV2 weights absent")
def test_model4_loads_real_imagenet_weights():
    model = models.build_model("model4", (96, 96, 3), CLASSES, weights=str(REAL_WEIGHTS))
    base = models.get_base(model)
    # ImageNet MobileNetV2 no-top: 2,257,984 weights, 34,112 of them BN moving statistics.
    assert base.count_params() == 2_257_984
    assert model.count_params() == 2_257_984 + dense_params(MOBILENET_NO_TOP_FEATURES, CLASSES)
    assert trainable_count(model) == dense_params(MOBILENET_NO_TOP_FEATURES, CLASSES)
    # Loaded, not random: every weight equals what Keras's own loader reads from the file.
    reference = keras.applications.MobileNetV2(
        input_shape=(96, 96, 3), include_top=False, weights=str(REAL_WEIGHTS)
    )
    for ours, theirs in zip(base.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    x, _ = random_images(2, shape=(96, 96, 3))
    assert np.isfinite(model.predict(x, verbose=0)).all()


def test_a_seeded_build_is_the_same_whatever_other_threads_draw():
    """Keras seeds unseeded layers from Python's global random stream; a thread of the same
    process drawing from it (as a Dask worker's or Prefect's may) must not change the model."""
    import random
    import threading

    import keras

    from catdog.models import build_model

    def weights() -> list:
        keras.utils.set_random_seed(7)
        model = build_model("model1", (32, 32, 3), 2, seed=7)
        return [w.copy() for w in model.get_weights()]

    quiet = weights()
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            random.random()

    drawing = threading.Thread(target=draw)
    drawing.start()
    try:
        noisy = weights()
    finally:
        stop.set()
        drawing.join()
    assert all(np.array_equal(a, b) for a, b in zip(quiet, noisy, strict=True))


def test_clearing_the_keras_session_keeps_the_kernels_of_what_is_still_in_use():
    """Keras forgets earlier layers' names and its global settings, as
    `keras.backend.clear_session()` does, but TensorFlow's instantiated kernels stay: a
    stateful random op's stream goes on, where clearing them would restart it."""
    import tensorflow as tf

    tf.random.set_seed(5)
    first = float(tf.random.uniform((), seed=1))
    keras.layers.Dense(1), keras.layers.Dense(1)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        models.clear_keras_session()
        assert keras.layers.Dense(1).name == "dense"
        assert keras.config.dtype_policy().name == "float32"
    finally:
        keras.config.set_dtype_policy("float32")
    assert float(tf.random.uniform((), seed=1)) != first
    keras.backend.clear_session()  # what it replaces restarts the stream
    assert float(tf.random.uniform((), seed=1)) == first


def test_without_kerass_internals_clearing_and_seeding_are_kerass_own(monkeypatch):
    """A Keras laid out otherwise (no `keras.src.utils.rng_utils`, no `keras.src.backend.common`):
    seeding and clearing do what Keras's own functions do, kernels and all."""
    import sys

    import tensorflow as tf

    monkeypatch.setitem(sys.modules, "keras.src.utils.rng_utils", None)
    monkeypatch.setitem(sys.modules, "keras.src.backend.common", None)
    tf.random.set_seed(5)
    first = float(tf.random.uniform((), seed=1))
    models.seed_everything(5)  # the same seed, set again: the stream restarts
    assert float(tf.random.uniform((), seed=1)) == first
    float(tf.random.uniform((), seed=1))
    models.clear_keras_session()
    assert float(tf.random.uniform((), seed=1)) == first
    random.seed(0), np.random.seed(0)
    models.seed_everything(9)
    assert (random.random(), np.random.rand()) == (
        random.Random(9).random(),
        np.random.RandomState(9).rand(),
    )
