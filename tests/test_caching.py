"""Caching across runs: what reruns when what changes, damaged caches, concurrent runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_dataset, zip_folder
from tests.test_flow import run_flow

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]
REPO = Path(__file__).resolve().parents[1]
DATA_STAGES = {"download_dataset", "extract_dataset", "build_manifest"}


def computed(summary: dict) -> set[str]:
    return {task for task, state in summary["tasks"].items() if state == "Completed"}


def test_seed_change_reruns_split_and_later_but_not_download(dataset_zip, tmp_path):
    artifacts = tmp_path / "artifacts"
    run_flow(dataset_zip, artifacts)
    summary = run_flow(dataset_zip, artifacts, seed=8)
    assert not computed(summary) & DATA_STAGES
    assert {
        "split_dataset",
        "count_labels",
        "plot_samples",
        "decode_images[32]",
        "train_model[model1]",
        "evaluate_model[model1]",
    } <= computed(summary)


def test_changed_data_reruns_everything(dataset_zip, tmp_path):
    artifacts = tmp_path / "artifacts"
    run_flow(dataset_zip, artifacts)
    other = zip_folder(make_dataset(tmp_path / "other", seed=5), tmp_path / "other.zip")
    summary = run_flow(other, artifacts)
    assert set(summary["tasks"].values()) == {"Completed"}


def test_changed_folder_dataset_reruns(tmp_path):
    folder = make_dataset(tmp_path / "photos")
    artifacts = tmp_path / "artifacts"
    first = run_flow(folder, artifacts)
    assert first["data"]["counts"]["train"] == {"cats": 12, "dogs": 12}
    again = run_flow(folder, artifacts)
    assert computed(again) == {"write_report"}
    shutil.copy(folder / "train/cats/cats.train.0.jpg", folder / "train/dogs/extra.jpg")
    (folder / "train/dogs/extra.jpg").write_bytes(
        (folder / "train/dogs/extra.jpg").read_bytes() + b"\0"
    )
    changed = run_flow(folder, artifacts)
    assert "build_manifest" in computed(changed)
    assert changed["data"]["counts"]["train"] == {"cats": 12, "dogs": 13}


def test_deleted_artifact_file_is_recomputed_not_served_stale(dataset_zip, tmp_path):
    artifacts = tmp_path / "artifacts"
    first = run_flow(dataset_zip, artifacts)
    model_path = Path(first["models"]["model1"]["path"])
    model_path.unlink()
    second = run_flow(dataset_zip, artifacts)
    assert "train_model[model1]" in computed(second)
    assert computed(second) & DATA_STAGES == set()
    assert model_path.is_file()


def test_refresh_from_a_stage_recomputes_that_stage_and_later(dataset_zip, tmp_path):
    artifacts = tmp_path / "artifacts"
    run_flow(dataset_zip, artifacts)
    summary = run_flow(dataset_zip, artifacts, refresh="train")
    assert computed(summary) == {"train_model[model1]", "evaluate_model[model1]", "write_report"}


def test_promotion_gate_promotes_then_keeps(dataset_zip, tmp_path):
    artifacts = tmp_path / "artifacts"
    first = run_flow(dataset_zip, artifacts)
    assert first["promotion"]["promoted"] is True
    registry = json.loads((artifacts / "production/registry.json").read_text())
    assert registry["model"] == "model1"
    assert registry["split_hash"] == first["data"]["split_hash"]
    assert (artifacts / "production/model.keras").is_file()

    kept = run_flow(dataset_zip, artifacts, epochs=2, promote_margin=1.0)
    assert kept["promotion"]["promoted"] is False
    assert "kept production" in kept["promotion"]["reason"]
    assert json.loads((artifacts / "production/registry.json").read_text()) == registry

    # A production model that scored nothing on this split: any candidate beats it.
    (artifacts / "production/registry.json").write_text(
        json.dumps({**registry, "test_accuracy": 0.0})
    )
    promoted = run_flow(dataset_zip, artifacts, epochs=3)
    assert promoted["promotion"]["promoted"] is True, promoted["promotion"]
    new_registry = json.loads((artifacts / "production/registry.json").read_text())
    assert new_registry["run_id"] != registry["run_id"]


def test_production_is_remeasured_at_its_own_input_size_on_a_new_split(dataset_zip, tmp_path):
    import keras
    import numpy as np

    from catdog.data.images import load_images
    from catdog.data.records import Manifest
    from catdog.evaluation import score
    from catdog.layout import STAGE_DIRS

    artifacts = tmp_path / "artifacts"
    run_flow(dataset_zip, artifacts)  # production: model1 on 32x32 images
    summary = run_flow(dataset_zip, artifacts, seed=8, image_size=40, promote_margin=1.0)
    assert summary["models"]["model1"]["image_size"] == 40
    assert summary["promotion"]["promoted"] is False

    split_dir = next(d for d in summary["artifacts_used"] if d.startswith(STAGE_DIRS["split"]))
    manifest = Manifest.load(artifacts / split_dir / "split.json")
    test = manifest.in_split("test")
    production = keras.models.load_model(artifacts / "production/model.keras", safe_mode=True)
    images = load_images(manifest.paths(test), 32).astype(np.float32)
    expected = score(production.predict(images, verbose=0), [e.label for e in test], ["c", "d"])
    assert summary["promotion"]["production_accuracy"] == pytest.approx(expected["accuracy"])


def flow_command(
    data: Path, artifacts: Path, *, epochs: int, checkout: Path = REPO, models: str = "model1"
) -> list:
    """`python flows/train_flow.py` for `models` on tiny images, as a user would type it."""
    return [
        sys.executable,
        str(checkout / "flows/train_flow.py"),
        "--data",
        str(data),
        "--models",
        models,
        "--epochs",
        str(epochs),
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--artifacts",
        str(artifacts),
    ]


def _flow_subprocess(
    data: Path,
    artifacts: Path,
    home: Path,
    pythonpath: Path | None = None,
    models: str = "model1",
):
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": ""}
    env.pop("PREFECT_API_URL")
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    command = flow_command(data, artifacts, epochs=1, checkout=pythonpath or REPO, models=models)
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=home.parent,
    )


def _run_summaries(artifacts: Path) -> list[dict]:
    return [
        json.loads(p.read_text())
        for p in sorted((artifacts / "05_reports/runs").glob("*/summary.json"))
    ]


def test_two_concurrent_runs_share_work_and_agree(dataset_zip, tmp_path):
    artifacts = tmp_path / "artifacts"
    runs = [_flow_subprocess(dataset_zip, artifacts, tmp_path / f"home{i}") for i in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    first, second = _run_summaries(artifacts)
    trained_by = [s["tasks"]["train_model[model1]"] for s in (first, second)]
    assert sorted(trained_by) == ["Cached", "Completed"]
    assert first["models"]["model1"]["history"] == second["models"]["model1"]["history"]
    assert first["models"]["model1"]["path"] == second["models"]["model1"]["path"]
    assert not list(artifacts.rglob(".*.tmp-*")) and not list(artifacts.rglob(".*.partial"))


def _checkout(folder: Path) -> Path:
    """A copy of the project's packages, imported instead of the installed ones when it is
    first on PYTHONPATH."""
    for package in ("catdog", "tasks", "flows"):
        shutil.copytree(
            REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return folder


def test_editing_library_code_invalidates_exactly_the_stages_that_run_it(dataset_zip, tmp_path):
    checkout = _checkout(tmp_path / "checkout")
    artifacts = tmp_path / "artifacts"
    first = _flow_subprocess(dataset_zip, artifacts, tmp_path / "home", checkout)
    assert first.wait(timeout=600) == 0, first.stdout.read()

    split_module = checkout / "catdog/data/split.py"
    source = split_module.read_text()
    split_module.write_text(
        source.replace(
            "def split_manifest(",
            "def _unused() -> None:\n    return None\n\n\ndef split_manifest(",
            1,
        )
    )
    second = _flow_subprocess(dataset_zip, artifacts, tmp_path / "home", checkout)
    assert second.wait(timeout=600) == 0, second.stdout.read()
    latest = _run_summaries(artifacts)[-1]
    assert not computed(latest) & DATA_STAGES
    assert "split_dataset" in computed(latest)


def test_same_archive_spelled_differently_is_one_cache_entry(dataset_zip, tmp_path):
    artifacts = tmp_path / "artifacts"
    run_flow(dataset_zip, artifacts)
    respelled = dataset_zip.parent / ".." / dataset_zip.parent.name / dataset_zip.name
    copy = tmp_path / "copy-of-tiny.zip"
    shutil.copyfile(dataset_zip, copy)
    for data in (respelled, copy):
        summary = run_flow(data, artifacts)
        assert computed(summary) == {"write_report"}, data


TINY_BUILDER = """
import keras


def make_tiny(input_shape, num_classes, *, seed=None, **_):
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(num_classes),
        ],
        name="tiny",
    )
"""

TINY_ENTRY = """
    ModelSpec(
        "tiny",
        "one convolution and a dense layer, for tests",
        "catdog.tiny:make_tiny",
    ),
)

CATALOG"""


def test_a_model_added_to_the_catalog_trains_through_the_flow(dataset_zip, tmp_path):
    checkout = _checkout(tmp_path / "checkout")
    (checkout / "catdog/tiny.py").write_text(TINY_BUILDER)
    catalog_module = checkout / "catdog/catalog.py"
    source = catalog_module.read_text()
    catalog_module.write_text(source.replace("\n)\n\nCATALOG", TINY_ENTRY, 1))

    artifacts = tmp_path / "artifacts"
    run = _flow_subprocess(dataset_zip, artifacts, tmp_path / "home", checkout, "tiny,model1")
    assert run.wait(timeout=600) == 0, run.stdout.read()
    summary = json.loads((artifacts / "summary.json").read_text())
    assert list(summary["models"]) == ["tiny", "model1"]
    tiny = summary["models"]["tiny"]
    assert tiny["image_size"] == 32 and tiny["epochs"] == 1
    assert tiny["total_params"] == (3 * 3 * 3 * 4 + 4) + (4 * 2 + 2)
    assert Path(tiny["path"]).is_file() and 0.0 <= tiny["test_accuracy"] <= 1.0
    assert summary["tasks"]["train_model[tiny]"] == "Completed"
    assert summary["tasks"]["evaluate_model[tiny]"] == "Completed"
