"""Suspect labels: the images a probe on the others' features doubts most."""

from __future__ import annotations

import numpy as np

from catdog.data.records import ImageEntry
from catdog.data.suspects import LISTED_SUSPECTS, rank_suspects


def entries(labels: np.ndarray, classes: tuple[str, ...] = ("cats", "dogs")) -> list[ImageEntry]:
    return [
        ImageEntry(f"train/{classes[y]}/{i}.jpg", int(y), classes[y], "0" * 64, "train", "train")
        for i, y in enumerate(labels)
    ]


def test_moved_labels_come_first_least_likely_first():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    features = np.array([[-3.0], [3.0]])[labels] + rng.normal(size=(200, 1))
    features = np.concatenate([features, rng.normal(size=(200, 15))], axis=1)
    given = labels.copy()
    moved = [3, 17, 42]
    given[moved] = 1
    suspects = rank_suspects(features, given, entries(given), 2, seed=0)
    assert len(suspects) == LISTED_SUSPECTS
    assert {s["path"] for s in suspects[:3]} == {f"train/dogs/{i}.jpg" for i in moved}
    assert all(s["label"] == "dogs" for s in suspects[:3])
    probabilities = [s["probability"] for s in suspects]
    assert probabilities == sorted(probabilities)
    assert all(p == round(p, 4) for p in probabilities)
    assert list(suspects[0]) == ["path", "label", "probability"]  # the record's order


def test_a_limit_and_a_class_too_small_to_hold_out():
    labels = np.array([0, 0, 0, 1, 1, 1])
    features = np.random.default_rng(0).normal(size=(6, 4))
    assert len(rank_suspects(features, labels, entries(labels), 2, seed=0, limit=4)) == 4
    lonely = np.array([0, 0, 0, 0, 0, 1])
    assert rank_suspects(features, lonely, entries(lonely), 2, seed=0) == []
    # A class with no image at all cannot be held out either.
    assert rank_suspects(features, labels, entries(labels), 3, seed=0) == []
