"""Metrics checked against numbers counted by hand."""

from __future__ import annotations

import numpy as np
import pytest

from catdog.evaluation import (
    classification_report,
    confusion_matrix,
    most_confident_errors,
    score,
    softmax,
)

# Ten samples, three classes, counted by hand:
#   true 0 (4 samples) predicted 0, 0, 1, 2  -> row [2, 1, 1]
#   true 1 (3 samples) predicted 1, 1, 0     -> row [1, 2, 0]
#   true 2 (3 samples) predicted 2, 2, 1     -> row [0, 1, 2]
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]
CM = [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
NAMES = ["cats", "dogs", "birds"]


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    np.testing.assert_array_equal(cm, CM)
    assert cm.dtype == np.int64


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="y_pred has 1"):
        confusion_matrix([0, 1], [0], 3)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix([0.5], [0], 3)


def test_report_by_hand():
    report = classification_report(np.array(CM), NAMES)
    # Diagonal 2 + 2 + 2 of 10 samples.
    assert report["accuracy"] == pytest.approx(0.6)
    cats, dogs, birds = (report["per_class"][n] for n in NAMES)
    # Column sums (predicted counts) 3, 4, 3; row sums (support) 4, 3, 3.
    assert cats == pytest.approx({"precision": 2 / 3, "recall": 2 / 4, "f1": 4 / 7, "support": 4})
    assert dogs == pytest.approx({"precision": 2 / 4, "recall": 2 / 3, "f1": 4 / 7, "support": 3})
    assert birds == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    # (4/7 + 4/7 + 2/3) / 3 = 38/63.
    assert report["macro_f1"] == pytest.approx(38 / 63)
    assert isinstance(report["per_class"]["cats"]["support"], int)
    assert isinstance(report["accuracy"], float)


def test_report_zero_division_is_zero():
    # Class "dogs" never occurs and is never predicted: every ratio is 0/0.
    report = classification_report(np.array([[2, 0], [0, 0]]), ["cats", "dogs"])
    assert report["per_class"]["dogs"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["per_class"]["cats"]["f1"] == 1.0
    assert report["macro_f1"] == 0.5
    empty = classification_report(np.zeros((2, 2), dtype=int), ["cats", "dogs"])
    assert empty["accuracy"] == 0.0
    assert empty["macro_f1"] == 0.0


def test_report_checks_names():
    with pytest.raises(ValueError, match="2 names"):
        classification_report(np.array(CM), ["a", "b"])


def test_softmax():
    probs = softmax(np.array([[0.0, 0.0], [1000.0, 0.0], [np.log(3.0), 0.0]]))
    np.testing.assert_allclose(probs, [[0.5, 0.5], [1.0, 0.0], [0.75, 0.25]], atol=1e-12)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0)


def test_most_confident_errors_ordering():
    y_true = [0, 1, 0, 1, 0, 1]
    probs = np.array(
        [
            [0.9, 0.1],  # right
            [0.8, 0.2],  # wrong, says 0 with 0.8
            [0.3, 0.7],  # wrong, says 1 with 0.7
            [0.05, 0.95],  # right
            [0.1, 0.9],  # wrong, says 1 with 0.9
            [0.8, 0.2],  # wrong, says 0 with 0.8: ties with sample 1, comes after it
        ]
    )
    assert most_confident_errors(y_true, probs, 10) == [4, 1, 5, 2]
    assert most_confident_errors(y_true, probs, 2) == [4, 1]
    assert most_confident_errors(y_true, probs, 0) == []
    assert most_confident_errors([0, 1], np.array([[0.6, 0.4], [0.1, 0.9]]), 5) == []


def test_score_from_logits():
    # Logits log(p) give probabilities p: rows 0 and 2 are right, row 1 is wrong (says 0).
    probs = np.array([[0.9, 0.1], [0.75, 0.25], [0.2, 0.8]])
    result = score(np.log(probs), [0, 1, 1], ["cats", "dogs"])
    assert result["predictions"] == [0, 0, 1]
    assert result["confidence"] == pytest.approx([0.9, 0.75, 0.8])
    assert result["confusion_matrix"] == [[1, 0], [1, 1]]
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["most_confident_errors"] == [1]
    # Mean cross-entropy: -(log 0.9 + log 0.25 + log 0.8) / 3.
    assert result["loss"] == pytest.approx(-(np.log(0.9) + np.log(0.25) + np.log(0.8)) / 3)
    assert result["per_class"]["dogs"]["recall"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        score(np.zeros((3, 3)), [0, 1, 1], ["cats", "dogs"])


def test_a_model_this_process_saved_is_taken_as_it_is_and_only_for_its_bytes(tmp_path):
    """`load_model` of the file a model was just saved to gives that model; the same path
    rewritten by another model gives the other model, read from the file."""
    import keras

    from catdog.evaluation import load_model, remember_saved

    def small(seed: int) -> keras.Model:
        inputs = keras.Input((4,))
        outputs = keras.layers.Dense(2, kernel_initializer=keras.initializers.GlorotUniform(seed))(
            inputs
        )
        return keras.Model(inputs, outputs)

    path = tmp_path / "model.keras"
    trained = small(1)
    trained.save(path)
    remember_saved(trained, path)
    assert load_model(path) is trained

    other = small(2)
    other.save(path)
    loaded = load_model(path)
    assert loaded is not trained and loaded is not other
    for got, want in zip(loaded.get_weights(), other.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
