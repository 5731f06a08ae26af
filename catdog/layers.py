"""Two Keras layers that compute what a built-in layer pair computes, in fewer CPU cycles.

`RandomFlipAndRotation` draws exactly what `RandomFlip("horizontal")` then
`RandomRotation(factor)` draw with the same seeds, and applies both as one affine transform:
a flip maps pixel centres onto pixel centres, so flipping then rotating with bilinear
interpolation and reflected edges is the rotation read from mirrored coordinates. That saves
the flip's full copy of the batch and its per-image select: about 30% of the augmentation's
CPU time in model2's and model3's epochs (bench/RESULTS.md, section `epoch-profile`).

`FusedBatchNormalization` is Keras's BatchNormalization computed by TensorFlow's fused kernel
(one pass for the statistics and the normalization, one for the gradient) where Keras 3
builds it from a dozen element-wise operations and casts; same statistics, same moving
averages, same weights in the saved file.

Both are registered with Keras (package "catdog"): a `.keras` file holding them loads in safe
mode once this module is imported (`catdog.evaluation.load_model` does). The SavedModel and
LiteRT exports need nothing of catdog.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

PACKAGE = "catdog"


def sub_seed(seed: int | None, offset: int) -> int | None:
    """A distinct seed per random layer, so the flip and the rotation don't draw one stream."""
    return None if seed is None else seed + offset


@keras.saving.register_keras_serializable(package=PACKAGE)
class RandomFlipAndRotation(keras.layers.Layer):
    """A random horizontal flip, then a random rotation by up to ±factor·2π, in one transform.

    The draws are those of `RandomFlip("horizontal", seed=seed)` followed by
    `RandomRotation(factor, seed=seed + 1)`, which this layer holds (as `flip` and `rotation`)
    and asks for their random transformations; the images are those two layers' output (with
    reflected edges and bilinear interpolation, their defaults) to float rounding. Active only
    with `training=True`; the identity otherwise.
    """

    def __init__(self, factor: float = 0.2, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = factor
        self.seed = seed
        self.flip = keras.layers.RandomFlip(
            "horizontal", seed=sub_seed(seed, 0), name="random_flip"
        )
        self.rotation = keras.layers.RandomRotation(
            factor, seed=sub_seed(seed, 1), name="random_rotation"
        )

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.flip.build(input_shape)
        self.rotation.build(input_shape)

    def call(self, images: Any, training: bool = True) -> Any:
        if not training:
            return keras.ops.cast(images, self.compute_dtype)
        flips = self.flip.get_random_transformation(images, training=True)["flips"]
        rotation = self.rotation.get_random_transformation(images, training=True)
        return self._transform(images, flips, rotation["rotation_matrix"])

    def call_seeded(self, images: Any, seeds: Sequence[int]) -> Any:
        """Image i drawn with its own seed `seeds[i]`, as this layer would draw it alone:
        the same image and seed give the same view whatever batch it comes in."""
        flips, matrices = [], []
        for i, seed in enumerate(seeds):
            one = images[i : i + 1]
            flip = self.flip.get_random_transformation(one, training=True, seed=sub_seed(seed, 0))
            rotation = self.rotation.get_random_transformation(
                one, training=True, seed=sub_seed(seed, 1)
            )
            flips.append(keras.ops.reshape(flip["flips"], (1,)))
            matrices.append(rotation["rotation_matrix"])
        return self._transform(
            images, keras.ops.concatenate(flips), keras.ops.concatenate(matrices, axis=0)
        )

    def _transform(self, images: Any, flips: Any, matrix: Any) -> Any:
        matrix = keras.ops.cast(matrix, "float32")
        # The transform maps each output pixel (x, y) to the input point it reads; reading a
        # mirrored image at x' is reading the image at (width - 1) - x'.
        width = keras.ops.cast(keras.ops.shape(images)[2], "float32")
        mirrored = keras.ops.concatenate(
            [-matrix[:, 0:1], -matrix[:, 1:2], (width - 1.0) - matrix[:, 2:3], matrix[:, 3:]],
            axis=1,
        )
        matrix = keras.ops.where(keras.ops.reshape(flips, (-1, 1)), mirrored, matrix)
        # In float32 whatever the policy: one rounding to the compute dtype at the end.
        moved = keras.ops.image.affine_transform(
            keras.ops.cast(images, "float32"),
            matrix,
            interpolation=self.rotation.interpolation,
            fill_mode=self.rotation.fill_mode,
            fill_value=self.rotation.fill_value,
        )
        return keras.ops.cast(moved, self.compute_dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    # Keras's own signature: the JSON its constructor takes back, as Keras serializes it.
    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "factor": self.factor, "seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` over the channels of NHWC images, in one fused kernel.

    The same normalization, trainable weights and moving averages as Keras's layer (whose
    moving variance is the batch's biased variance; the kernel returns the unbiased one, which
    is rescaled). Inputs of another rank or axis, masks, renormalization and synchronized
    statistics go to Keras's own implementation.
    """

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        if (
            mask is not None
            or self.renorm
            or self.synchronized
            or len(inputs.shape) != 4
            or self.axis not in (-1, 3)
        ):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        gamma = self.gamma if self.scale else tf.ones([channels], tf.float32)
        beta = self.beta if self.center else tf.zeros([channels], tf.float32)
        from_batch = bool(training and self.trainable)
        # From the batch, the kernel takes empty statistics and returns the batch's.
        empty = tf.zeros([0], tf.float32)
        outputs, mean, unbiased, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=gamma,
            offset=beta,
            mean=empty if from_batch else self.moving_mean,
            variance=empty if from_batch else self.moving_variance,
            epsilon=self.epsilon,
            data_format="NHWC",
            is_training=from_batch,
        )
        if from_batch:
            count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
            biased = tf.where(count > 1.0, unbiased * (count - 1.0) / count, 0.0)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + biased * (1.0 - self.momentum)
            )
        return keras.ops.cast(outputs, self.compute_dtype)
