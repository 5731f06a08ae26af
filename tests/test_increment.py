"""A growing folder source: each run computes per-image work only for the images it changed."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from catdog.config import DATA
from catdog.data.records import Manifest
from catdog.data.samples import sample_entries
from catdog.hashing import sha256_file
from tests.conftest import ALWAYS_RUN, SMALL, make_dataset, run_flow, write_image

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

PER_IMAGE = (
    "build_manifest",
    "inspect_images",
    "decode_images[48]",
    "extract_features[model4]",
    "evaluate_model[model4]",  # scored on its base's features of the test images
    "find_suspect_labels",  # training images scored by a probe that never saw them
)


def run(data: Path, artifacts: Path) -> dict:
    # Files modified in the last two seconds are read again next time (their time may not
    # change with them): new ones are dated a minute back, as a folder's images usually are
    # long written when a run reads them.
    for path in data.rglob("*.jpg"):
        if path.stat().st_mtime > time.time() - 30:
            os.utime(path, (time.time() - 60, time.time() - 60))
    return run_flow(data, artifacts, models=["model4"], weights="none", transfer_image_size=48)


def cost(summary: dict) -> dict[str, tuple[int, int]]:
    """(computed, reused) of each per-image stage, as the summary reports them."""
    stages = summary["increment"]["stages"]
    return {label: (stages[label]["computed"], stages[label]["reused"]) for label in PER_IMAGE}


def test_new_images_cost_only_themselves_a_relabel_no_pixels_and_a_rerun_nothing(tmp_path):
    data = make_dataset(tmp_path / "photos", train=8, validation=6)
    artifacts = tmp_path / "artifacts"

    first = run(data, artifacts)
    images = first["data"]["images"]  # 28
    assert first["increment"]["images"] is None  # nothing to compare with
    assert cost(first)["build_manifest"] == (images, 0)
    assert cost(first)["decode_images[48]"] == (images, 0)
    tested = len_of(first, "test")
    assert cost(first)["evaluate_model[model4]"] == (tested, 0)
    assert cost(first)["find_suspect_labels"] == (len_of(first, "train"), 0)
    # Scored on cached features, it scores as the saved model does on the test images.
    evaluated = Path(artifacts, first_dir(first, "04_evaluations/model4"))
    # Its base has the weights of the one that computed the features: it is not run to check.
    assert json.loads((evaluated / "record.json").read_text())["base_check"] == "weights"
    assert np.allclose(
        np.load(evaluated / "probabilities.npy"),
        saved_model_probabilities(artifacts, first),
        atol=1e-5,
    )

    for number in range(2):  # two new training images of cats
        write_image(data / "train" / "cats" / f"new.{number}.jpg", 90_000 + number)
    second = run(data, artifacts)
    assert second["increment"]["images"] == {"new": 2, "changed": 0, "moved": 0, "removed": 0}
    assert cost(second) == {
        "build_manifest": (2, images),
        "inspect_images": (2, images),
        "decode_images[48]": (2, images),
        "extract_features[model4]": (2, len_of(second, "train") + len_of(second, "validation") - 2),
        "evaluate_model[model4]": (0, tested),  # a new model, on test images embedded before
        "find_suspect_labels": (2, len_of(second, "train") - 2),
    }
    # The sample figures are redrawn only when a new image ranks among those they show.
    shown = [sample_keys(artifacts, summary) for summary in (first, second)]
    assert (second["tasks"]["plot_samples"] == "Cached") == (shown[0] == shown[1])
    manifest = json.loads(
        Path(artifacts, stage_dir(second, "manifests"), "record.json").read_text()
    )
    assert manifest["files_read"] == 2  # the other files' size and time had not changed

    # A relabel: a cat moved into the dogs' folder.
    moved = data / "train" / "dogs" / "relabelled.jpg"
    shutil.move(data / "train" / "cats" / "cats.0.jpg", moved)
    third = run(data, artifacts)
    assert third["increment"]["images"] == {"new": 0, "changed": 0, "moved": 1, "removed": 0}
    assert {label: computed for label, (computed, _reused) in cost(third).items()} == dict.fromkeys(
        PER_IMAGE, 0
    )
    decoded = Path(artifacts, stage_dir(third, "arrays"))
    keys = json.loads((decoded / "train_keys.json").read_text())["keys"]
    labels = np.load(decoded / "train_y.npy")
    row = keys.index(sha256_file(moved))
    assert third["data"]["classes"][labels[row]] == "dogs"  # it trains under its new label

    fourth = run(data, artifacts)
    recomputed = {task for task, state in fourth["tasks"].items() if state != "Cached"}
    assert recomputed == ALWAYS_RUN
    assert fourth["increment"]["images"] == {"new": 0, "changed": 0, "moved": 0, "removed": 0}
    assert all(computed == 0 for computed, _reused in cost(fourth).values())


def sample_keys(artifacts: Path, summary: dict) -> dict[str, list[str]]:
    split = Manifest.load(artifacts / stage_dir(summary, "splits") / "split.json")
    shown = sample_entries(split, per_class=DATA.samples_per_class, seed=SMALL["seed"])
    return {name: [entry.sha256 for entry in entries] for name, entries in shown.items()}


def len_of(summary: dict, split: str) -> int:
    return sum(summary["data"]["counts"][split].values())


def first_dir(summary: dict, prefix: str) -> str:
    (found,) = [d for d in summary["artifacts_used"] if d.startswith(f"{prefix}/")]
    return found


def saved_model_probabilities(artifacts: Path, summary: dict) -> np.ndarray:
    """What the saved model4 gives the decoded test images, run whole on their pixels."""
    from catdog.evaluation import load_model, predict_logits, softmax

    model = load_model(Path(artifacts, first_dir(summary, "04_models/model4"), "model.keras"))
    images = np.load(Path(artifacts, stage_dir(summary, "arrays"), "test_x.npy"))
    return softmax(predict_logits(model, images))


def stage_dir(summary: dict, stage_folder: str) -> str:
    """The run's output folder of the stage kept in `03_splits/<stage_folder>`."""
    (found,) = [d for d in summary["artifacts_used"] if d.startswith(f"03_splits/{stage_folder}/")]
    return found
