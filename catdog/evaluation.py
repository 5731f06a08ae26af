"""Metrics on predictions, in plain numpy so they are cheap to test; TensorFlow is imported only
to load and run a saved model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from numpy.typing import ArrayLike

from catdog.arrays import Rows
from catdog.hashing import sha256_file_uncached


class ClassScores(TypedDict):
    precision: float
    recall: float
    f1: float
    support: int  # images of the class


class ClassificationReport(TypedDict):
    accuracy: float
    per_class: dict[str, ClassScores]
    macro_f1: float


class Scores(ClassificationReport):
    """`score`'s result: plain Python values, ready for JSON."""

    loss: float
    confusion_matrix: list[list[int]]
    predictions: list[int]
    confidence: list[float]
    most_confident_errors: list[int]


def _labels(values: ArrayLike, num_classes: int, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{what} must be one label per sample; got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must be integer class indices; got dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(f"{what} has labels outside 0..{num_classes - 1}")
    return array


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """Count (true, predicted) label pairs.

    Args:
        y_true: True class index per sample.
        y_pred: Predicted class index per sample.
        num_classes: Number of classes; labels must lie in 0..num_classes-1.

    Returns:
        An int64 array of shape (num_classes, num_classes): rows true, columns predicted.

    Raises:
        ValueError: The label arrays differ in length, are not 1-D integers, or are out of
            range.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1; got {num_classes}")
    true = _labels(y_true, num_classes, "y_true")
    pred = _labels(y_pred, num_classes, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} labels but y_pred has {pred.size}")
    # One bincount over the flattened (true, pred) index: no Python loop over samples.
    counts = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _ratio(numerator: float, denominator: float) -> float:
    # A class that is never predicted (or never present) has an undefined precision (recall);
    # report 0.0 as scikit-learn's zero_division=0 does, rather than NaN in a JSON report.
    return float(numerator / denominator) if denominator else 0.0


def classification_report(cm: ArrayLike, class_names: Sequence[str]) -> ClassificationReport:
    """Accuracy, per-class precision / recall / F1 / support and macro F1 from a confusion matrix.

    Args:
        cm: Square confusion matrix, rows true, columns predicted (see `confusion_matrix`).
        class_names: One name per row, in class-index order.

    Returns:
        {"accuracy": float, "per_class": {name: {"precision", "recall", "f1", "support"}},
        "macro_f1": float}, all plain Python numbers (JSON-ready). Undefined ratios are 0.0.

    Raises:
        ValueError: `cm` is not square or does not match `class_names`.
    """
    matrix = np.asarray(cm)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square; got shape {matrix.shape}")
    if matrix.shape[0] != len(class_names):
        raise ValueError(
            f"confusion matrix has {matrix.shape[0]} classes but {len(class_names)} names"
        )
    true_totals = matrix.sum(axis=1)
    pred_totals = matrix.sum(axis=0)
    per_class: dict[str, ClassScores] = {}
    f1s: list[float] = []
    for index, name in enumerate(class_names):
        hits = float(matrix[index, index])
        precision = _ratio(hits, float(pred_totals[index]))
        recall = _ratio(hits, float(true_totals[index]))
        f1 = _ratio(2 * precision * recall, precision + recall)
        per_class[str(name)] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(true_totals[index]),
        }
        f1s.append(f1)
    return {
        "accuracy": _ratio(float(np.trace(matrix)), float(matrix.sum())),
        "per_class": per_class,
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
    }


def softmax(logits: ArrayLike) -> np.ndarray:
    """Softmax over the last axis, stable for large logits.

    Args:
        logits: Array of shape (..., num_classes).

    Returns:
        Float64 probabilities of the same shape, summing to 1 along the last axis.
    """
    values = np.asarray(logits, dtype=np.float64)
    # Subtracting the row maximum changes nothing mathematically but keeps exp from overflowing.
    shifted = values - values.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def most_confident_errors(y_true: ArrayLike, probs: ArrayLike, k: int) -> list[int]:
    """Indices of the misclassified samples the model was most sure about.

    Args:
        y_true: True class index per sample.
        probs: Probabilities of shape (n, num_classes); the prediction is the argmax.
        k: At most this many indices are returned.

    Returns:
        Indices of misclassified samples, sorted by the probability of the (wrong) predicted
        class, highest first; ties keep sample order.

    Raises:
        ValueError: Shapes do not match.
    """
    probabilities = np.asarray(probs, dtype=np.float64)
    if probabilities.ndim != 2:
        raise ValueError(f"probs must have shape (n, classes); got {probabilities.shape}")
    true = _labels(y_true, probabilities.shape[1], "y_true")
    if true.shape[0] != probabilities.shape[0]:
        raise ValueError(f"y_true has {true.size} labels but probs has {len(probabilities)} rows")
    if k <= 0:
        return []
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != true)
    confidence = probabilities[wrong, predicted[wrong]]
    # Stable sort on the negated confidence: descending, ties in sample order.
    order = np.argsort(-confidence, kind="stable")
    return [int(i) for i in wrong[order][:k]]


def score(logits: ArrayLike, y_true: ArrayLike, class_names: Sequence[str]) -> Scores:
    """Everything the report needs from a model's logits on a labelled split.

    Args:
        logits: Model outputs of shape (n, num_classes).
        y_true: True class index per sample.
        class_names: Names in class-index order.

    Returns:
        `classification_report`'s keys (accuracy, per_class, macro_f1) plus "loss" (mean
        cross-entropy, as Keras's from_logits loss), "confusion_matrix" (nested lists),
        "predictions" (argmax per sample), "confidence" (probability of the predicted class
        per sample) and "most_confident_errors" (every misclassified index, surest first).
        All values are plain Python types, ready for JSON.

    Raises:
        ValueError: Shapes do not match `class_names` or each other.
    """
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(class_names):
        raise ValueError(f"logits must have shape (n, {len(class_names)}); got {values.shape}")
    num_classes = len(class_names)
    true = _labels(y_true, num_classes, "y_true")
    if true.shape[0] != values.shape[0]:
        raise ValueError(f"y_true has {true.size} labels but logits has {len(values)} rows")
    probs = softmax(values)
    predicted = probs.argmax(axis=1)
    # log-softmax directly from logits: log(softmax) would give -inf for tiny probabilities.
    shifted = values - values.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(true)), true].mean()) if len(true) else 0.0
    cm = confusion_matrix(true, predicted, num_classes)
    report = classification_report(cm, class_names)
    return {
        **report,
        "loss": loss,
        "confusion_matrix": cm.tolist(),
        "predictions": [int(p) for p in predicted],
        "confidence": [float(c) for c in probs[np.arange(len(true)), predicted]],
        "most_confident_errors": most_confident_errors(true, probs, len(true)),
    }


# The model this process saved last, by the SHA-256 of the file it saved: the evaluation of a
# model the same process just trained (a frozen base under a head) takes it as it is instead
# of building MobileNetV2 again from the file (0.6 s or more, most of an incremental
# evaluation). Only the bytes decide: a file saved by another process, or changed since, is
# loaded.
_SAVED: dict[str, Any] = {}


def remember_saved(model: Any, path: str | os.PathLike[str]) -> None:
    """Keep `model`, just saved to `path` and not to be changed after, for `load_model` of
    the same bytes in this process (one model at a time)."""
    _SAVED.clear()
    _SAVED[sha256_file_uncached(Path(path))] = model


def load_model(path: str | os.PathLike[str]) -> Any:
    """A saved `.keras` model, loaded in safe mode (no Lambda layers, no arbitrary code); the
    model itself when this process saved these bytes (`remember_saved`)."""
    if _SAVED and (saved := _SAVED.get(sha256_file_uncached(Path(path)))) is not None:
        return saved
    import keras  # here, so that the metrics above stay importable without TensorFlow

    import catdog.layers  # noqa: F401  registers catdog's layers with Keras

    return keras.models.load_model(path, safe_mode=True)


def predict_logits(model: Any, images: Rows, batch_size: int = 64) -> np.ndarray:
    """A Keras model's logits on `images` (rows of its input: uint8 pixels at its input size,
    or base features for `catdog.models.classifier`), a batch at a time, so that a split on
    disk is never whole in memory."""
    from catdog.models import predict_batch

    outputs = [
        predict_batch(model, images[start : start + batch_size])
        for start in range(0, len(images), batch_size)
    ]
    classes = int(model.output_shape[-1])
    return np.concatenate(outputs) if outputs else np.empty((0, classes), np.float32)


# The base features of this many validation images, read from the feature cache, must match
# those the saved model's own base computes before its cache is used to score it.
BASE_CHECK_IMAGES = 8


def same_base(extractor: Any, images: Rows, cached: Rows) -> bool:
    """Whether a saved model's base (`extractor`, catdog.models.feature_extractor) computes
    the cached features `cached` of the first `images`: the cache was made by another copy
    of the base, and features of other weights would score the model wrongly."""
    count = min(BASE_CHECK_IMAGES, len(images), len(cached))
    if count == 0:
        return False
    from catdog.models import predict_batch

    computed = predict_batch(extractor, images[:count])
    expected = np.asarray(cached[:count])
    # Relative to the features' own scale (a randomly initialised base gives tiny ones), and
    # loose enough for TF32 and batch-size effects on a GPU (about 1e-3): another base's
    # features differ by their whole size.
    return bool(np.abs(computed - expected).max() <= 1e-2 * np.abs(expected).max())


def score_model(model: Any, images: Rows, labels: ArrayLike, class_names: Sequence[str]) -> Scores:
    """Predict `images` (uint8, at the model's input size) with a Keras model and `score` it."""
    return score(predict_logits(model, images), labels, class_names)
