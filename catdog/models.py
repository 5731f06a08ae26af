"""The builders of the catalog's models (`catdog.catalog`), and building a model by name.

model1 is the blog's CNN; model2 puts augmentation first and trains convolution blocks with
batch normalization behind it; model3 is MobileNetV2's input scaling, the augmentation and the
blog's layers; model4 is the TensorFlow transfer-learning tutorial: a frozen ImageNet
MobileNetV2 with a new classification head. model4_finetune has model4's architecture; it is
trained as model4 first, then `unfreeze_top` opens the top of the base to fine-tuning.

Every model takes float32 pixel values in 0..255 and outputs logits, and every model saves to
and loads from the `.keras` format in safe mode: no Lambda layers, only built-in layers and
the two of `catdog.layers` (the augmentation, model2's batch normalization), which this module
registers by importing it.
"""

from __future__ import annotations

import os

# Set before TensorFlow is first imported, which happens through keras below.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gc
import importlib
import random
import socket
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import keras
import numpy as np

from catdog import catalog
from catdog.config import MIN_MOBILENET_SIZE, TRAIN
from catdog.errors import ModelError, WeightsError
from catdog.layers import FusedBatchNormalization, RandomFlipAndRotation, sub_seed
from catdog.weights import resolve_weights

BASE_LAYER_NAME = "mobilenetv2_base"  # the MobileNetV2 sub-model inside model4
PREPROCESS_LAYER_NAME = "preprocess"  # scales 0..255 to -1..1, as mobilenet_v2.preprocess_input
AUGMENTATION_LAYER_NAME = "augmentation"  # the random flip and rotation
HEAD_LAYER_NAME = "head"  # the final Dense layer that outputs logits

# Where Keras itself downloads MobileNetV2's weights from (keras.applications.mobilenet_v2).
IMAGENET_WEIGHTS_BASE_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
)
# Sizes for which Keras publishes MobileNetV2 weights; other sizes use the 224 file, as Keras.
_IMAGENET_SIZES = (96, 128, 160, 192, 224)
# Seconds a single connect or read of the weights download may stall. urllib has no timeout
# of its own, so without this a network that drops packets silently would hang the build.
DOWNLOAD_TIMEOUT_S = 20.0

# --- weights ---------------------------------------------------------------------------------


def imagenet_weights_filename(image_size: int) -> str:
    """The Keras file name of the no-top MobileNetV2 (alpha 1.0) weights for `image_size`."""
    rows = image_size if image_size in _IMAGENET_SIZES else 224
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # The default timeout is process-wide; only set it when nobody else chose one, and put
    # it back afterwards so the rest of the program keeps its own behaviour.
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        if previous is None:
            socket.setdefaulttimeout(None)


def fetch_imagenet_weights(
    image_size: int,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    base_url: str = IMAGENET_WEIGHTS_BASE_URL,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> str:
    """Return a local path to Keras's ImageNet MobileNetV2 no-top weights, downloading once.

    The file is looked up in (and downloaded to) Keras's cache, `~/.keras/models` or
    `$KERAS_HOME/models`, exactly where `MobileNetV2(weights="imagenet")` would put it.

    Args:
        image_size: Input height (= width); picks the weights file as Keras does.
        cache_dir: Cache folder instead of Keras's (tests).
        base_url: Folder URL the file is downloaded from.
        timeout: Seconds a connect or read may stall before the download fails.

    Returns:
        The path of the weights file.

    Raises:
        WeightsError: The file is not cached and could not be downloaded.
    """
    fname = imagenet_weights_filename(image_size)
    try:
        with _socket_timeout(timeout):
            return keras.utils.get_file(
                fname,
                base_url + fname,
                cache_subdir="models",
                cache_dir=None if cache_dir is None else os.fspath(cache_dir),
            )
    except Exception as exc:  # Keras wraps URLError/HTTPError in a bare Exception
        raise WeightsError(
            f"could not download the ImageNet MobileNetV2 weights ({_download_reason(exc)}); "
            "pass a local file with --weights PATH or CATDOG_WEIGHTS, "
            "e.g. mobilenet_v2_1.0_224_no_top.h5"
        ) from exc


def _download_reason(exc: BaseException) -> str:
    # Keras's message is "URL fetch failure on <url>: <errno> -- <reason>"; the URL and errno
    # add nothing for the user, the reason ("Name or service not known", "timed out") does.
    # For an HTTP error <errno> is the status code, worth keeping: "HTTP 404 Not Found".
    text = str(exc) or type(exc).__name__
    if " -- " in text:
        head, text = text.split(" -- ", 1)
        code = head.rsplit(": ", 1)[-1].strip()
        if code.isdigit():
            text = f"HTTP {code} {text}"
    return " ".join(text.split())  # one line, whatever the underlying error looked like


# --- building blocks -------------------------------------------------------------------------


def clear_keras_session() -> None:
    """`keras.backend.clear_session()`, less its clearing of TensorFlow's kernel cache.

    Keras forgets the models built before (their layer names, its global settings) and the
    garbage is collected, so a process that trains several models (a Dask worker does) builds
    each as a fresh process would. TensorFlow frees the instantiated graphs of a deleted model
    by itself; clearing its whole cache dropped those of models still in use too, so the next
    call of one instantiated its graph again: 0.2 s of one thread for MobileNetV2, which the
    evaluation paid to embed a few new test images with the base the features stage traced.
    """
    import tensorflow as tf

    try:
        from keras.src.backend.common import global_state
    except ImportError:  # a Keras laid out otherwise: its own clear, kernels and all
        keras.backend.clear_session()
        return
    global_state.GLOBAL_STATE_TRACKER = threading.local()
    global_state.GLOBAL_SETTINGS_TRACKER = threading.local()
    tf.compat.v1.reset_default_graph()
    gc.collect()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, Keras and TensorFlow as `keras.utils.set_random_seed(seed)` does,
    but leave TensorFlow's global seed alone when it is `seed` already.

    Setting TensorFlow's seed clears every kernel the process has instantiated (see
    `clear_keras_session`). What setting it again would reset is nothing a stage here draws
    from: Keras layers and initializers draw with seeds of their own (stateless ops), and
    tf.data's random ops take the global seed when their pipeline is traced.
    """
    try:
        from keras.src.backend.common import global_state
        from keras.src.random import seed_generator
        from keras.src.utils.rng_utils import GLOBAL_RANDOM_SEED
        from tensorflow.python.eager import context
    except ImportError:  # a Keras or TensorFlow laid out otherwise: seed as Keras does
        keras.utils.set_random_seed(seed)
        return
    if context.global_seed() != seed:
        keras.utils.set_random_seed(seed)
        return
    global_state.set_global_attribute(GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)


class SeedStream:
    """Explicit seeds for the layers and initializers that draw one, in the order they are built.

    Keras seeds a layer or initializer built without a seed from Python's global `random`
    stream, which any other thread of the process (a Dask worker's, Prefect's) may draw from
    meanwhile. These seeds come from a stream of their own, started at `seed`: the numbers
    Keras would draw from an undisturbed global stream seeded alike
    (`keras.utils.set_random_seed(seed)`), whatever else runs. Without a seed, Keras draws.
    """

    def __init__(self, seed: int | None) -> None:
        self._draws = random.Random(seed) if seed is not None else None

    def draw(self) -> int | None:
        """The next seed, as Keras draws one (`randint(1, 1e9)`); None without a seed."""
        return None if self._draws is None else self._draws.randint(1, int(1e9))

    def glorot_uniform(self) -> keras.initializers.Initializer:
        """Keras's default kernel initializer, with the next seed."""
        return keras.initializers.GlorotUniform(seed=self.draw())


def make_augmentation(seed: int | None = None) -> RandomFlipAndRotation:
    """The blog's data augmentation: random horizontal flip, then rotation by up to ±20%·2π.

    The draws of `RandomFlip("horizontal")` and `RandomRotation(0.2)` seeded `seed` and
    `seed + 1`, applied as one transform (`catdog.layers.RandomFlipAndRotation`). Active only
    when the model is called with `training=True` (fit); identity in predict.

    Args:
        seed: Seed of the random layers; None draws a fresh one.

    Returns:
        A layer named "augmentation".
    """
    return RandomFlipAndRotation(0.2, seed=seed, name=AUGMENTATION_LAYER_NAME)


def _logits(num_classes: int, seeds: SeedStream) -> keras.layers.Layer:
    # float32 logits keep the loss numerically stable under a mixed-precision policy.
    return keras.layers.Dense(
        num_classes,
        kernel_initializer=seeds.glorot_uniform(),
        name=HEAD_LAYER_NAME,
        dtype="float32",
    )


def _preprocess() -> keras.layers.Layer:
    # Same arithmetic as keras.applications.mobilenet_v2.preprocess_input (x / 127.5 - 1), but
    # as a built-in layer so the model saves and loads in safe mode, which a Lambda does not.
    return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name=PREPROCESS_LAYER_NAME)


def _cnn_layers(num_classes: int, seed: int | None) -> list[keras.layers.Layer]:
    # The blog's CNN, layer for layer; names only make summaries and saved files readable.
    kernels = SeedStream(seed)
    return [
        keras.layers.Conv2D(
            32, 3, activation="relu", kernel_initializer=kernels.glorot_uniform(), name="conv1"
        ),
        keras.layers.MaxPooling2D(name="pool1"),
        keras.layers.Conv2D(
            32, 3, activation="relu", kernel_initializer=kernels.glorot_uniform(), name="conv2"
        ),
        keras.layers.MaxPooling2D(name="pool2"),
        keras.layers.Conv2D(
            64, 3, activation="relu", kernel_initializer=kernels.glorot_uniform(), name="conv3"
        ),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(
            64, activation="relu", kernel_initializer=kernels.glorot_uniform(), name="dense1"
        ),
        keras.layers.Dense(
            64, activation="relu", kernel_initializer=kernels.glorot_uniform(), name="dense2"
        ),
        keras.layers.Dropout(0.5, seed=sub_seed(seed, 2), name="dropout"),
        _logits(num_classes, kernels),
    ]


def _input(input_shape: tuple[int, int, int]) -> keras.KerasTensor:
    return keras.Input(shape=tuple(input_shape), dtype="float32", name="image")


# --- the models ------------------------------------------------------------------------------


def make_model1(
    input_shape: tuple[int, int, int], num_classes: int, *, seed: int | None = None, **_: Any
) -> keras.Model:
    """The blog's CNN on raw 0..255 pixels (the blog does not rescale; neither do we).

    Args:
        input_shape: (height, width, channels).
        num_classes: Number of output logits.
        seed: Seed of the dropout layer.
        **_: Ignored, so every builder takes the registry's keyword arguments.

    Returns:
        A Sequential named "model1".
    """
    return keras.Sequential([_input(input_shape), *_cnn_layers(num_classes, seed)], name="model1")


def _conv_block(filters: int, index: int, kernels: SeedStream) -> list[keras.layers.Layer]:
    # Batch normalization after each block: on raw 0..255 pixels, the blog's layers behind
    # augmentation stall near chance (50.0% at one seed, bench/HISTORY.md, seeds-224); normalized
    # activations train at the same rate whatever the input's scale. After the pooling, where
    # the maps are a quarter of the size: right after the first convolution it made an epoch
    # 4.8 times slower on two cores (93 s against model1's 19 s), for the same normalization
    # (ReLU and max pooling pass a scale through unchanged).
    return [
        keras.layers.Conv2D(
            filters,
            3,
            activation="relu",
            kernel_initializer=kernels.glorot_uniform(),
            name=f"conv{index}",
        ),
        keras.layers.MaxPooling2D(name=f"pool{index}"),
        FusedBatchNormalization(name=f"bn{index}"),
    ]


def make_model2(
    input_shape: tuple[int, int, int], num_classes: int, *, seed: int | None = None, **_: Any
) -> keras.Model:
    """Random flip and rotation (active only while training), then three blocks of Conv2D,
    MaxPooling2D and BatchNormalization, Flatten, Dense 64, Dropout 0.5 and the logits.

    The assignment's rules: augmentation first, no input scaling (that is model3's step), at
    least two Conv2D, two MaxPooling2D, a Flatten, a Dense and a Dropout.

    Args:
        input_shape: (height, width, channels).
        num_classes: Number of output logits.
        seed: Seed of the augmentation and dropout layers.
        **_: Ignored, so every builder takes the registry's keyword arguments.

    Returns:
        A Sequential named "model2".
    """
    kernels = SeedStream(seed)
    return keras.Sequential(
        [
            _input(input_shape),
            make_augmentation(seed),
            *_conv_block(32, 1, kernels),
            *_conv_block(32, 2, kernels),
            *_conv_block(64, 3, kernels),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(
                64, activation="relu", kernel_initializer=kernels.glorot_uniform(), name="dense1"
            ),
            keras.layers.Dropout(0.5, seed=sub_seed(seed, 2), name="dropout"),
            _logits(num_classes, kernels),
        ],
        name="model2",
    )


def make_model3(
    input_shape: tuple[int, int, int], num_classes: int, *, seed: int | None = None, **_: Any
) -> keras.Model:
    """MobileNetV2's input scaling (0..255 to -1..1), the augmentation, then the blog's CNN.

    It is the blog's model3, not catdog's model2 (no batch normalization, no cosine decay).

    Args:
        input_shape: (height, width, channels).
        num_classes: Number of output logits.
        seed: Seed of the augmentation and dropout layers.
        **_: Ignored, so every builder takes the registry's keyword arguments.

    Returns:
        A Sequential named "model3".
    """
    return keras.Sequential(
        [
            _input(input_shape),
            _preprocess(),
            make_augmentation(seed),
            *_cnn_layers(num_classes, seed),
        ],
        name="model3",
    )


def _check_mobilenet_shape(input_shape: tuple[int, int, int]) -> None:
    height, width, channels = input_shape
    if channels != 3 or min(height, width) < MIN_MOBILENET_SIZE:
        raise ModelError(
            f"model4 needs RGB images of at least {MIN_MOBILENET_SIZE}x{MIN_MOBILENET_SIZE} "
            f"(MobileNetV2); got input shape {tuple(input_shape)}"
        )


def _mobilenet_base(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    weights = resolve_weights(weights)
    if weights == "imagenet":
        weights = fetch_imagenet_weights(input_shape[0] if input_shape[0] == input_shape[1] else 0)
    # Built without weights and loaded afterwards, so that an error in the weights file is
    # reported as a WeightsError and an error in the shape is not mistaken for one.
    base = keras.applications.MobileNetV2(
        input_shape=tuple(input_shape), include_top=False, weights=None, name=BASE_LAYER_NAME
    )
    if weights is not None:
        try:
            base.load_weights(weights)
        except Exception as exc:
            raise WeightsError(
                f"could not load MobileNetV2 weights from {weights!r}: "
                f"{' '.join(str(exc).split())[:300]}"
            ) from exc
    return base


def _draw_kernels(base: keras.Model, seeds: SeedStream) -> None:
    """Draws a random base's kernels again, each from the next seed of `seeds`, in build order.

    The base that computed model4's cached features and the one saved with the head trained
    on them must be one, so a random base is drawn from the seed alone. Seeding the process's
    global streams first is not enough: another thread (Prefect's, a Dask worker's) may draw
    from them while the base is built.
    """
    for layer in base.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        initializer = getattr(layer, "depthwise_initializer", None) or layer.kernel_initializer
        seeded = type(initializer).from_config({**initializer.get_config(), "seed": seeds.draw()})
        kernel.assign(seeded(kernel.shape, dtype=kernel.dtype))


def make_model4(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    weights: str | None = "imagenet",
    dropout: float = TRAIN.dropout,
    seed: int | None = None,
    name: str = "model4",
    **_: Any,
) -> keras.Model:
    """Transfer learning as in the TensorFlow tutorial: a frozen MobileNetV2 and a new head.

    Input -> preprocess -> augmentation -> MobileNetV2 (frozen, inference mode) -> global
    average pooling -> dropout -> Dense logits. Only the head's weights train.

    Args:
        input_shape: (height, width, 3), at least 32x32.
        num_classes: Number of output logits.
        weights: None for random init, "imagenet", or a local `.h5` file (see
            `catdog.weights.resolve_weights`).
        dropout: Dropout rate before the head.
        seed: Seed of the augmentation and dropout layers.
        name: The model's name.
        **_: Ignored, so every builder takes the registry's keyword arguments.

    Returns:
        A functional model; its base is `get_base(model)`.

    Raises:
        WeightsError: The weights cannot be found, downloaded or loaded.
        ModelError: The input shape is not one MobileNetV2 accepts.
    """
    input_shape = tuple(input_shape)
    _check_mobilenet_shape(input_shape)
    base = _mobilenet_base(input_shape, weights)
    if resolve_weights(weights) is None and seed is not None:
        _draw_kernels(base, SeedStream(seed))
    base.trainable = False

    inputs = _input(input_shape)
    x = _preprocess()(inputs)
    x = make_augmentation(seed)(x)
    # training=False keeps BatchNormalization in inference mode even after unfreeze_top, so
    # fine-tuning does not wreck the ImageNet statistics (the tutorial's advice).
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, seed=sub_seed(seed, 2), name="dropout")(x)
    outputs = _logits(num_classes, SeedStream(seed))(x)
    return keras.Model(inputs, outputs, name=name)


def make_model4_finetune(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    weights: str | None = "imagenet",
    dropout: float = TRAIN.dropout,
    seed: int | None = None,
    **_: Any,
) -> keras.Model:
    """model4's architecture under another name; train it as model4, then `unfreeze_top`.

    Args:
        input_shape: (height, width, 3), at least 32x32.
        num_classes: Number of output logits.
        weights: As `make_model4`.
        dropout: Dropout rate before the head.
        seed: Seed of the augmentation and dropout layers.
        **_: Ignored, so every builder takes the registry's keyword arguments.

    Returns:
        A functional model named "model4_finetune", base frozen.
    """
    return make_model4(
        input_shape,
        num_classes,
        weights=weights,
        dropout=dropout,
        seed=seed,
        name="model4_finetune",
    )


def get_base(model: keras.Model) -> keras.Model:
    """The MobileNetV2 sub-model of a model4 / model4_finetune model.

    Raises:
        ModelError: `model` has no MobileNetV2 base.
    """
    try:
        return model.get_layer(BASE_LAYER_NAME)
    except ValueError as exc:
        raise ModelError(
            f"model {model.name!r} has no {BASE_LAYER_NAME!r} layer; only model4 and "
            "model4_finetune have a pretrained base"
        ) from exc


def get_augmentation(model: keras.Model) -> keras.layers.Layer:
    """The "augmentation" layer of model2, model3, model4 or model4_finetune.

    Call it with `training=True` to draw augmented images; it is the identity otherwise.

    Raises:
        ModelError: `model` has no augmentation (model1).
    """
    try:
        return model.get_layer(AUGMENTATION_LAYER_NAME)
    except ValueError as exc:
        raise ModelError(f"model {model.name!r} has no {AUGMENTATION_LAYER_NAME!r} layer") from exc


_TRACED: weakref.WeakKeyDictionary[keras.Model, Callable[[Any], Any]] = weakref.WeakKeyDictionary()
_TRACING = threading.Lock()


def predict_batch(model: keras.Model, batch: np.ndarray) -> np.ndarray:
    """`model`'s outputs (float32) on one batch of its inputs, in inference mode.

    Traced once per model for batches of every size. `predict_on_batch` traces again for the
    first batch of another size: for MobileNetV2, a second or more of a stage that embeds a
    few new images in batches of 64 and then the rest, or checks 8 images first.
    """
    import tensorflow as tf

    with _TRACING:
        call = _TRACED.get(model)
        if call is None:
            spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
            held = weakref.ref(model)  # the cache must not keep the model alive
            call = _TRACED[model] = tf.function(
                lambda inputs: held()(inputs, training=False), input_signature=[spec]
            )
    return np.asarray(call(tf.convert_to_tensor(batch, tf.float32)), dtype=np.float32)


def feature_extractor(model: keras.Model) -> keras.Model:
    """A model mapping 0..255 images to model4's pooled base features (the head's input).

    It shares layers (and weights) with `model`. In predict the augmentation inside is the
    identity, so the features are those of the images as given. Because flip and rotation
    (bilinear, reflect fill) commute with the affine preprocessing, augmenting raw images
    with `get_augmentation(model)` before extracting matches what the model sees in fit.

    Args:
        model: A model4 / model4_finetune model.

    Returns:
        A functional model with output shape (batch, 1280) for MobileNetV2 alpha 1.0.

    Raises:
        ModelError: `model` has no MobileNetV2 base.
    """
    get_base(model)  # a clear error for models without a base
    return keras.Model(model.inputs, model.get_layer("pool").output, name="feature_extractor")


def classifier(model: keras.Model) -> keras.Model:
    """The layers of a model4 / model4_finetune model after its pooled base features: a
    model mapping `feature_extractor`'s output to the model's logits, sharing its weights.

    Raises:
        ModelError: `model` has no MobileNetV2 base.
    """
    get_base(model)
    return keras.Model(model.get_layer("pool").output, model.output, name="classifier")


def make_head(
    feature_dim: int, num_classes: int, *, dropout: float = TRAIN.dropout, seed: int | None = None
) -> keras.Model:
    """model4's classification head alone, to train on cached base features.

    Its layers carry model4's names ("dropout", "head"), so `transplant_head` can copy the
    trained weights into a full model4.

    Args:
        feature_dim: Length of a feature vector (1280 for MobileNetV2).
        num_classes: Number of output logits.
        dropout: Dropout rate before the Dense layer, as model4's.
        seed: Seeds the dropout layer and the Dense layer's initial weights.

    Returns:
        A functional model: features -> dropout -> logits.
    """
    seeds = SeedStream(seed)
    inputs = keras.Input(shape=(feature_dim,), dtype="float32", name="features")
    x = keras.layers.Dropout(dropout, seed=seeds.draw(), name="dropout")(inputs)
    outputs = _logits(num_classes, seeds)(x)
    return keras.Model(inputs, outputs, name="head_model")


def transplant_head(head: keras.Model, model: keras.Model) -> None:
    """Copy the Dense weights of a `make_head` model into model4's "head" layer.

    Raises:
        ModelError: Either model lacks a "head" layer or their shapes differ.
    """
    try:
        source = head.get_layer(HEAD_LAYER_NAME)
        target = model.get_layer(HEAD_LAYER_NAME)
    except ValueError as exc:
        raise ModelError(f"both models need a {HEAD_LAYER_NAME!r} layer: {exc}") from exc
    weights = source.get_weights()
    expected = [tuple(w.shape) for w in target.get_weights()]
    if [tuple(w.shape) for w in weights] != expected:
        raise ModelError(
            f"head weights {[tuple(w.shape) for w in weights]} do not fit model "
            f"{model.name!r}'s head {expected}"
        )
    target.set_weights(weights)


def unfreeze_top(model: keras.Model, fine_tune_at: int = 100) -> None:
    """Make the base's layers from index `fine_tune_at` on trainable, the rest frozen.

    As the TensorFlow tutorial (whose base has 154 layers, counting the input layer). The base
    stays called with training=False, so BatchNormalization keeps using its ImageNet moving
    statistics. Compile the model again afterwards (usually with a smaller learning rate):
    Keras fixes the trainable weights at compile time.

    Args:
        model: A model4 / model4_finetune model.
        fine_tune_at: Index of the first base layer to train.

    Raises:
        ModelError: `model` has no base or `fine_tune_at` is out of range.
    """
    base = get_base(model)
    if not 0 <= fine_tune_at <= len(base.layers):
        raise ModelError(
            f"fine_tune_at={fine_tune_at} is outside the base's 0..{len(base.layers)} layers"
        )
    base.trainable = True
    for layer in base.layers[:fine_tune_at]:
        layer.trainable = False


# --- building by name ------------------------------------------------------------------------


def builder(name: str) -> Callable[..., keras.Model]:
    """The function that builds model `name`, as its catalog entry names it.

    Raises:
        ModelError: Unknown name, or its builder cannot be imported.
    """
    module_name, _, function = catalog.spec(name).builder.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise ModelError(
            f"model {name!r}: cannot import its builder {module_name}:{function}"
        ) from exc


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    weights: str | None = None,
    seed: int | None = None,
    dropout: float = TRAIN.dropout,
) -> keras.Model:
    """Build a model of the catalog by name.

    Args:
        name: A name in `catdog.catalog.CATALOG`.
        input_shape: (height, width, channels).
        num_classes: Number of classes (at least 2).
        weights: For models on a frozen base: None, "imagenet" or a local `.h5` path.
            Ignored by the other models.
        seed: Seed of the random layers (augmentation, dropout).
        dropout: The dropout rate before a frozen-base model's head.

    Returns:
        The uncompiled model; see `compile_model`.

    Raises:
        ModelError: Unknown name, bad input shape or fewer than 2 classes.
        WeightsError: The weights cannot be found, downloaded or loaded.
    """
    make = builder(name)
    if len(tuple(input_shape)) != 3 or min(input_shape) < 1:
        raise ModelError(f"input shape must be (height, width, channels); got {input_shape}")
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes; got {num_classes}")
    return make(tuple(input_shape), num_classes, weights=weights, seed=seed, dropout=dropout)


def compile_model(
    model: keras.Model,
    learning_rate: float = 1e-3,
    *,
    decay_steps: int | None = None,
    steps_per_execution: int = 1,
) -> keras.Model:
    """Compile as the blog: Adam, sparse categorical cross-entropy on logits, accuracy.

    Args:
        model: Any model built here.
        learning_rate: Adam's learning rate.
        decay_steps: When given, the rate follows a cosine from `learning_rate` down to zero
            over this many steps, instead of staying constant.
        steps_per_execution: Training steps run per call into TensorFlow: the same updates,
            with Keras's per-step overhead paid once per call.

    Returns:
        The same model, compiled.
    """
    rate: float | keras.optimizers.schedules.LearningRateSchedule = learning_rate
    if decay_steps:
        rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model
