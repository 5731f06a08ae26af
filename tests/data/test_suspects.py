"""Suspect labels: the images a probe on the others' features doubts most."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from catdog.data.records import ImageEntry
from catdog.data.suspects import LISTED_SUSPECTS, PROBE_SHARE, label_probabilities, rank_suspects


def entries(labels: np.ndarray, classes: tuple[str, ...] = ("cats", "dogs")) -> list[ImageEntry]:
    return [
        ImageEntry(f"train/{classes[y]}/{i}.jpg", int(y), classes[y], f"{i:064x}", "train", "train")
        for i, y in enumerate(labels)
    ]


def two_classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features that separate two classes along one axis, with noise on 15 others."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    features = np.array([[-3.0], [3.0]])[labels] + rng.normal(size=(n, 1))
    return np.concatenate([features, rng.normal(size=(n, 15))], axis=1), labels


def score(features, labels, keys, pieces: Path, classes: int = 2):
    return label_probabilities(
        features, labels, keys, classes, seed=0, pieces=pieces, features_made_by="features"
    )


def test_moved_labels_come_first_least_likely_first(tmp_path):
    features, labels = two_classes(200, seed=0)
    given = labels.copy()
    moved = [3, 17, 42]
    given[moved] = 1
    images = entries(given)
    scores = score(features, given, [e.sha256 for e in images], tmp_path)
    assert scores.cross_validated and (scores.reuse.computed, scores.reuse.reused) == (200, 0)
    suspects = rank_suspects(scores.own, images)
    assert len(suspects) == LISTED_SUSPECTS
    assert {s["path"] for s in suspects[:3]} == {f"train/dogs/{i}.jpg" for i in moved}
    assert all(s["label"] == "dogs" for s in suspects[:3])
    probabilities = [s["probability"] for s in suspects]
    assert probabilities == sorted(probabilities)
    assert all(p == round(p, 4) for p in probabilities)
    assert list(suspects[0]) == ["path", "label", "probability"]  # the record's order
    assert len(rank_suspects(scores.own, images, limit=4)) == 4


def test_a_class_too_small_to_hold_out(tmp_path):
    features = np.random.default_rng(0).normal(size=(6, 4))
    keys = [f"{i}" for i in range(6)]
    assert score(features, np.array([0, 0, 0, 0, 0, 1]), keys, tmp_path) is None
    # A class with no image at all cannot be held out either.
    assert score(features, np.array([0, 0, 0, 1, 1, 1]), keys, tmp_path, classes=3) is None


def test_new_images_are_scored_alone_until_too_many_are_not_cross_validated(tmp_path):
    features, labels = two_classes(240, seed=1)
    keys = [f"image-{i}" for i in range(240)]
    old = np.arange(240) % 12 != 0  # 220 images first, 20 new ones next
    first = score(features[old], labels[old], [keys[i] for i in np.flatnonzero(old)], tmp_path)

    given = labels.copy()
    given[[0, 12]] = 1 - given[[0, 12]]  # two new images filed under the wrong class
    given[1] = 1 - given[1]  # and an old one moved to the other class
    second = score(features, given, keys, tmp_path)
    assert not second.cross_validated
    assert (second.reuse.computed, second.reuse.reused) == (20, 220)
    # Earlier images keep their probabilities; the moved one is judged under its new label.
    kept = old.copy()
    kept[1] = False
    assert np.allclose(second.own[kept], first.own[np.delete(np.arange(220), 0)], atol=1e-6)
    assert np.isclose(second.own[1], 1 - first.own[0], atol=1e-5)
    top = set(np.argsort(second.own)[:3])
    assert top == {0, 1, 12}

    # Beyond PROBE_SHARE of the split scored without cross-validation, every fold is fitted.
    grown, grown_labels = two_classes(int(240 * PROBE_SHARE) + 20, seed=2)
    all_features = np.concatenate([features, grown])
    all_labels = np.concatenate([given, grown_labels])
    all_keys = keys + [f"more-{i}" for i in range(len(grown))]
    third = score(all_features, all_labels, all_keys, tmp_path)
    assert third.cross_validated
    assert (third.reuse.computed, third.reuse.reused) == (len(all_keys), 0)
    # The next increment is scored by the new cross-validation's probe.
    fourth = score(all_features[:-1], all_labels[:-1], all_keys[:-1], tmp_path)
    assert not fourth.cross_validated and fourth.reuse.computed == 0
    assert np.allclose(fourth.own, third.own[:-1], atol=1e-6)
