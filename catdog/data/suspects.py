"""Suspect labels: training images whose label a probe on the other images' features finds
least likely (no Prefect import).

Scoring every image means fitting a probe per fold over the whole training split, which costs
as much for one new image as for all of them. So each image's class probabilities are kept by
its content (`catdog.pieces`), under the cross-validation that scored it, together with the
average of that cross-validation's fold probes. A later run scores only its new images, with
that probe (which saw none of them either), until more than `PROBE_SHARE` of the training
split would be scored so; then every fold is fitted again. A moved image keeps its
probabilities and is judged under its new label.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catdog.arrays import Rows
from catdog.data.findings import Suspect
from catdog.data.probe import LinearProbe, out_of_fold_probabilities
from catdog.data.records import ImageEntry
from catdog.hashing import HashMemo, code_fingerprint
from catdog.pieces import PieceStore, Reuse

LISTED_SUSPECTS = 20  # kept in the record and shown in the report
# At most this share of the training images is scored by an earlier cross-validation's probe
# rather than held out of a fold; beyond it, every fold is fitted again.
PROBE_SHARE = 0.2
PROBE_NOTE = "probe"


@dataclass(frozen=True)
class Scores:
    """Each training image's probability of its own label, and how it was come by."""

    own: np.ndarray  # one per image, in the split's order
    reuse: Reuse  # images scored now, and those whose probabilities were kept
    cross_validated: bool  # every fold fitted in this run
    folders: list[Path]  # the pieces they were read from: the probes' and the scores'


def label_probabilities(
    features: Rows,
    labels: np.ndarray,
    keys: Sequence[str],
    num_classes: int,
    *,
    seed: int,
    pieces: Path,
    features_made_by: Any,
    memo: HashMemo | None = None,
) -> Scores | None:
    """Each image's probability of its own label from a probe that never saw it; None when
    a class has fewer than two images (no fold could hold one out).

    Args:
        features: One row per image, in the order of `labels` and `keys`.
        labels: Each image's class index.
        keys: Each image's content hash.
        num_classes: Classes the labels index.
        seed: Assigns the images to folds.
        pieces: The root of the piece stores (`catdog.pieces`).
        features_made_by: What computed the features (their pieces' folder): the scores
            are kept per features, seed and code.
        memo: Remembers the hashes of the stores' files.
    """
    made_by = {
        "features": features_made_by,
        "seed": seed,
        "code": code_fingerprint("catdog.data.probe", "catdog.data.suspects"),
    }

    def scores_of(probe: str) -> PieceStore:
        return PieceStore.at(pieces, "suspects", {**made_by, "probe": probe}, memo)

    smallest = min(np.bincount(labels, minlength=num_classes))
    if smallest < 2:
        return None
    labels = np.asarray(labels, dtype=np.int64)
    probes = PieceStore.at(pieces, "probes", made_by, memo)
    for note in probes.notes(PROBE_NOTE):
        if note.get("classes") != num_classes:
            continue
        scores = scores_of(note["name"])
        known = scores.values()
        new = [row for row, key in enumerate(keys) if key not in known]
        kept_by_probe = sum(1 for key in keys if not known.get(key, {}).get("held_out", False))
        if kept_by_probe > PROBE_SHARE * len(keys):
            break  # too much scored without cross-validation: fit again
        probabilities = LinearProbe.from_json(note["probe"]).probabilities(features[new])
        scores.add_values(
            (keys[row], {"p": p.round(6).tolist(), "held_out": False})
            for row, p in zip(new, probabilities, strict=True)
        )
        known.update({keys[row]: {"p": p} for row, p in zip(new, probabilities, strict=True)})
        own = np.array([known[key]["p"][label] for key, label in zip(keys, labels, strict=True)])
        reuse = Reuse(len(new), len(keys) - len(new))
        return Scores(own, reuse, False, [probes.folder, scores.folder])

    probabilities, probe = out_of_fold_probabilities(
        np.asarray(features), labels, num_classes, folds=min(5, smallest), seed=seed
    )
    name = _name(probe)
    scores = scores_of(name)
    scores.add_values(
        (key, {"p": p.round(6).tolist(), "held_out": True})
        for key, p in zip(keys, probabilities, strict=True)
    )
    probes.add_note(PROBE_NOTE, {"name": name, "classes": num_classes, "probe": probe.to_json()})
    own = probabilities[np.arange(len(labels)), labels]
    return Scores(own, Reuse(len(keys), 0), True, [probes.folder, scores.folder])


def _name(probe: LinearProbe) -> str:
    text = json.dumps(probe.to_json(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rank_suspects(
    own: np.ndarray, images: Sequence[ImageEntry], *, limit: int = LISTED_SUSPECTS
) -> list[Suspect]:
    """The `limit` images whose own label is least likely (`own`, in the order of `images`),
    the least likely first."""
    return [
        Suspect(
            path=images[i].path,
            label=images[i].class_name,
            probability=round(float(own[i]), 4),
        )
        for i in np.argsort(own, kind="stable")[:limit]
    ]
