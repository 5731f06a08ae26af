"""The blog's and the assignment's code, kept as written: the baseline catdog is timed against.

Everything between `run_blog`'s first and last line follows the TensorFlow cats-vs-dogs blog
and the transfer-learning tutorial: `image_dataset_from_directory` on the extracted folders,
the test set taken as the first fifth of the (reshuffled) validation batches, AUTOTUNE
prefetch, and `model.fit` on the decoded-every-epoch JPEG pipeline. model4 runs every epoch
through the frozen MobileNetV2. Nothing here is optimised on purpose.

Run as a script (one measurement per process, as bench/run.py does):

    python bench/blog_recipe.py --data-dir /tmp/x/cats_and_dogs_filtered --model model1 \
        --epochs 2 --weights ../shared/weights/mobilenet_v2_1.0_224_no_top.h5 --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

BLOG_MODELS = ("model1", "model2", "model3", "model4")
BATCH_SIZE = 32
IMG_SIZE = (160, 160)


def extract_zip(zip_path: Path, dest: Path) -> Path:
    """Extract the dataset archive into `dest` once; return the folder holding train/."""
    marker = dest / ".extracted"
    if not marker.is_file():
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(dest)
        marker.write_text(str(zip_path))
    for candidate in [dest, *sorted(p for p in dest.iterdir() if p.is_dir())]:
        if (candidate / "train").is_dir() and (candidate / "validation").is_dir():
            return candidate
    raise FileNotFoundError(f"no train/ and validation/ folders under {dest}")


def _cnn_layers(num_classes: int) -> list[Any]:
    import tensorflow as tf

    return [
        tf.keras.layers.Conv2D(32, 3, activation="relu"),
        tf.keras.layers.MaxPooling2D(),
        tf.keras.layers.Conv2D(32, 3, activation="relu"),
        tf.keras.layers.MaxPooling2D(),
        tf.keras.layers.Conv2D(64, 3, activation="relu"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dropout(0.5),
        tf.keras.layers.Dense(num_classes),
    ]


def _data_augmentation() -> Any:
    import tensorflow as tf

    return tf.keras.Sequential(
        [
            tf.keras.layers.RandomFlip("horizontal"),
            tf.keras.layers.RandomRotation(0.2),
        ]
    )


def build_blog_model(name: str, weights: str, num_classes: int = 2) -> Any:
    """model1..model4 as the blog, the assignment and the transfer-learning tutorial build them."""
    import tensorflow as tf

    img_shape = (*IMG_SIZE, 3)
    preprocess_input = tf.keras.applications.mobilenet_v2.preprocess_input
    if name == "model1":
        return tf.keras.Sequential([tf.keras.Input(shape=img_shape), *_cnn_layers(num_classes)])
    if name == "model2":
        return tf.keras.Sequential(
            [tf.keras.Input(shape=img_shape), _data_augmentation(), *_cnn_layers(num_classes)]
        )
    if name == "model3":
        inputs = tf.keras.Input(shape=img_shape)
        x = _data_augmentation()(inputs)
        x = preprocess_input(x)
        for layer in _cnn_layers(num_classes):
            x = layer(x)
        return tf.keras.Model(inputs, x)
    if name == "model4":
        base_model = tf.keras.applications.MobileNetV2(
            input_shape=img_shape, include_top=False, weights=weights
        )
        base_model.trainable = False
        inputs = tf.keras.Input(shape=img_shape)
        x = _data_augmentation()(inputs)
        x = preprocess_input(x)
        x = base_model(x, training=False)
        x = tf.keras.layers.GlobalAveragePooling2D()(x)
        x = tf.keras.layers.Dropout(0.2)(x)
        outputs = tf.keras.layers.Dense(num_classes)(x)
        return tf.keras.Model(inputs, outputs)
    raise ValueError(f"unknown blog model {name!r}; choose from {', '.join(BLOG_MODELS)}")


def _peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_blog(data_dir: Path, model_name: str, epochs: int, weights: str, seed: int) -> dict:
    """Train one model exactly as the blog does; return timings, history and test accuracy.

    Args:
        data_dir: The extracted dataset folder (holding train/ and validation/).
        model_name: model1, model2, model3 or model4.
        epochs: Epochs of `model.fit`.
        weights: MobileNetV2 weights for model4: "imagenet" or a no-top `.h5` path.
        seed: Passed to `keras.utils.set_random_seed` (the blog sets none; runs vary anyway).

    Returns:
        A JSON-able dict: epoch_seconds, history, test_accuracy, total_seconds (loading the
        datasets, building and fitting: time to a trained model), fit_seconds,
        evaluate_seconds, params and peak_rss_bytes of this process.
    """
    started = time.perf_counter()
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    train_dir = os.path.join(data_dir, "train")
    validation_dir = os.path.join(data_dir, "validation")

    train_dataset = tf.keras.utils.image_dataset_from_directory(
        train_dir, shuffle=True, batch_size=BATCH_SIZE, image_size=IMG_SIZE
    )
    validation_dataset = tf.keras.utils.image_dataset_from_directory(
        validation_dir, shuffle=True, batch_size=BATCH_SIZE, image_size=IMG_SIZE
    )
    class_names = train_dataset.class_names

    val_batches = tf.data.experimental.cardinality(validation_dataset)
    test_dataset = validation_dataset.take(val_batches // 5)
    validation_dataset = validation_dataset.skip(val_batches // 5)

    AUTOTUNE = tf.data.AUTOTUNE
    train_dataset = train_dataset.prefetch(buffer_size=AUTOTUNE)
    validation_dataset = validation_dataset.prefetch(buffer_size=AUTOTUNE)
    test_dataset = test_dataset.prefetch(buffer_size=AUTOTUNE)

    model = build_blog_model(model_name, weights, num_classes=len(class_names))
    # The assignment compiles every model the same way: optimizer "adam" (learning rate 1e-3).
    model.compile(
        optimizer="adam",
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )

    epoch_seconds: list[float] = []

    class EpochTimer(tf.keras.callbacks.Callback):
        """Wall time of every epoch (training and validation), as catdog's EpochLog."""

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            epoch_seconds.append(time.perf_counter() - self._t)
            print(
                f"blog {model_name} epoch {epoch + 1}/{epochs}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in (logs or {}).items())
                + f" ({epoch_seconds[-1]:.1f} s)",
                file=sys.stderr,
                flush=True,
            )

    fit_started = time.perf_counter()
    history = model.fit(
        train_dataset,
        epochs=epochs,
        validation_data=validation_dataset,
        callbacks=[EpochTimer()],
        verbose=0,
    )
    fit_seconds = time.perf_counter() - fit_started
    total_seconds = time.perf_counter() - started

    evaluate_started = time.perf_counter()
    loss, accuracy = model.evaluate(test_dataset, verbose=0)
    evaluate_seconds = time.perf_counter() - evaluate_started

    trainable = sum(int(tf.size(w)) for w in model.trainable_weights)
    total = trainable + sum(int(tf.size(w)) for w in model.non_trainable_weights)
    return {
        "model": model_name,
        "epochs": epochs,
        "seed": seed,
        "classes": list(class_names),
        "epoch_seconds": epoch_seconds,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "test_accuracy": float(accuracy),
        "test_loss": float(loss),
        "total_seconds": total_seconds,
        "fit_seconds": fit_seconds,
        "evaluate_seconds": evaluate_seconds,
        "trainable_params": trainable,
        "total_params": total,
        "peak_rss_bytes": _peak_rss_bytes(),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: one blog measurement, its result written as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", type=Path, help="extracted folder holding train/")
    source.add_argument("--zip", type=Path, help="dataset .zip (extracted into --extract-to)")
    parser.add_argument("--extract-to", type=Path, default=None, help="folder for --zip")
    parser.add_argument("--model", default="model1", choices=BLOG_MODELS)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out", type=Path, default=None, help="JSON result (default stdout)")
    args = parser.parse_args(argv)
    data_dir = args.data_dir
    if args.zip is not None:
        import tempfile

        dest = args.extract_to or Path(tempfile.mkdtemp(prefix="blog-data-"))
        dest.mkdir(parents=True, exist_ok=True)
        data_dir = extract_zip(args.zip, dest)
    result = run_blog(data_dir, args.model, args.epochs, args.weights, args.seed)
    text = json.dumps(result, indent=1)
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
