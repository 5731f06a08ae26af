"""catdog's two layers compute what the built-in layers they stand for compute."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

from catdog import layers, models
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # TensorFlow


def keras_augmentation(seed: int) -> keras.Sequential:
    """The built-in pair the models' augmentation stands for, seeded as it is."""
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.2, seed=seed + 1),
        ]
    )


def images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape).astype("float32")


@pytest.mark.parametrize("shape", [(16, 40, 56, 3), (8, 33, 33, 1)])
def test_flip_and_rotation_draw_and_move_as_the_keras_pair(shape):
    x = images(shape)
    ours, theirs = models.make_augmentation(seed=5), keras_augmentation(5)
    moved = 0
    for _ in range(3):  # every call draws anew, from the same streams in both
        a = np.asarray(ours(x, training=True))
        b = np.asarray(theirs(x, training=True))
        np.testing.assert_allclose(a, b, atol=2e-3)  # on 0..255 pixels
        moved += int(np.any(np.abs(a - x) > 1.0))
    assert moved == 3  # the comparison above is of transformed images, not of two identities


def test_the_flip_alone_is_a_mirror_image():
    # A rotation range of zero leaves the flip: each image is itself or its exact mirror.
    x = images((32, 20, 24, 3))
    out = np.asarray(layers.RandomFlipAndRotation(0.0, seed=3)(x, training=True))
    mirrored = np.all(np.isclose(out, x[:, :, ::-1, :], atol=1e-3), axis=(1, 2, 3))
    unchanged = np.all(np.isclose(out, x, atol=1e-3), axis=(1, 2, 3))
    assert np.all(mirrored | unchanged)
    assert 0 < mirrored.sum() < len(x)


def test_augmentation_is_the_identity_outside_training():
    x = images((4, 24, 24, 3))
    out = models.make_augmentation(seed=1)(x, training=False)
    np.testing.assert_array_equal(np.asarray(out), x)


def test_augmentation_rounds_once_to_the_compute_dtype():
    x = images((4, 24, 24, 3))
    mixed = layers.RandomFlipAndRotation(0.2, seed=2, dtype="mixed_bfloat16")
    exact = layers.RandomFlipAndRotation(0.2, seed=2)
    out = mixed(x, training=True)
    assert out.dtype == tf.bfloat16
    expected = np.asarray(exact(x, training=True))
    # bf16 keeps 8 significant bits: within half a unit of the last place on 0..255.
    np.testing.assert_allclose(np.asarray(tf.cast(out, tf.float32)), expected, rtol=2**-8)


def paired_batch_norms(**kwargs: object) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    ours = layers.FusedBatchNormalization(**kwargs)
    theirs = keras.layers.BatchNormalization(**kwargs)
    for layer in (ours, theirs):
        layer.build((8, 10, 12, 5))
    return ours, theirs


def test_fused_batch_norm_trains_as_keras_batch_norm():
    ours, theirs = paired_batch_norms(momentum=0.9)
    # A loss whose gradient is far from zero for every input, gamma and beta.
    weights = tf.constant(np.random.default_rng(7).uniform(0.5, 2.0, (8, 10, 12, 5)), tf.float32)
    for step in range(3):
        x = tf.constant(np.random.default_rng(step).normal(3.0, 2.0, (8, 10, 12, 5)), tf.float32)
        outputs, grads = [], []
        for layer in (ours, theirs):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * weights + tf.square(y))
            outputs.append(np.asarray(y))
            grads.append([np.asarray(g) for g in tape.gradient(loss, [x, layer.gamma, layer.beta])])
        np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)
        for g_ours, g_theirs in zip(*grads, strict=True):
            np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-4, atol=1e-4)
    # The moving averages: Keras keeps the biased variance; the kernel returns the unbiased one.
    np.testing.assert_allclose(ours.moving_mean.numpy(), theirs.moving_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        ours.moving_variance.numpy(), theirs.moving_variance.numpy(), rtol=1e-5
    )
    assert not np.allclose(theirs.moving_variance.numpy(), 1.0)  # they did move
    x = tf.constant(np.random.default_rng(9).normal(3.0, 2.0, (8, 10, 12, 5)), tf.float32)
    np.testing.assert_allclose(
        np.asarray(ours(x, training=False)), np.asarray(theirs(x, training=False)), atol=1e-5
    )


def test_fused_batch_norm_under_bfloat16_keeps_float32_statistics():
    ours, theirs = paired_batch_norms(dtype="mixed_bfloat16")
    x = tf.constant(np.random.default_rng(1).normal(3.0, 2.0, (8, 10, 12, 5)), tf.bfloat16)
    y_ours, y_theirs = ours(x, training=True), theirs(x, training=True)
    assert y_ours.dtype == y_theirs.dtype == tf.bfloat16
    as_float = [np.asarray(tf.cast(y, tf.float32)) for y in (y_ours, y_theirs)]
    np.testing.assert_allclose(*as_float, atol=0.05)
    assert ours.moving_variance.dtype == "float32"
    np.testing.assert_allclose(
        ours.moving_variance.numpy(), theirs.moving_variance.numpy(), rtol=1e-3
    )


def test_fused_batch_norm_hands_other_shapes_to_keras():
    ours, theirs = layers.FusedBatchNormalization(), keras.layers.BatchNormalization()
    x = tf.constant(np.random.default_rng(2).normal(size=(6, 7)), tf.float32)
    np.testing.assert_allclose(
        np.asarray(ours(x, training=True)), np.asarray(theirs(x, training=True)), atol=1e-5
    )


def test_a_saved_model2_loads_in_a_fresh_process_through_catdog(tmp_path):
    # The layers are registered by importing catdog.layers: `load_model` does it, so a
    # process that has imported nothing else of catdog loads the file in safe mode.
    model = models.build_model("model2", (32, 32, 3), 2, seed=0)
    path = tmp_path / "model2.keras"
    model.save(path)
    x = images((3, 32, 32, 3))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", model.predict(x, verbose=0))
    script = (
        "import numpy as np, sys\n"
        "from catdog.evaluation import load_model\n"
        f"m = load_model({str(path)!r})\n"
        f"got = m.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0)\n"
        f"np.testing.assert_allclose(got, np.load({str(tmp_path / 'expected.npy')!r}), atol=1e-5)\n"
        "print(type(m.get_layer('augmentation')).__name__, type(m.get_layer('bn1')).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["RandomFlipAndRotation", "FusedBatchNormalization"]
