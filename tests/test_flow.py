"""The real flow, under Prefect's real engine, on small generated data."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import pytest

from flows.cli import main
from tests.conftest import ALWAYS_RUN, REAL_ZIP, run_flow

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


def test_first_run_computes_second_reuses_and_epochs_rerun_only_training(dataset_zip, tmp_path):
    artifacts = tmp_path / "artifacts"
    started = time.perf_counter()
    first = run_flow(dataset_zip, artifacts)
    first_seconds = time.perf_counter() - started

    assert first["data"]["counts"] == {
        "train": {"cats": 12, "dogs": 12},
        "validation": {"cats": 8, "dogs": 8},
        "test": {"cats": 2, "dogs": 2},
    }
    assert first["data"]["baseline_accuracy"] == 0.5
    model = first["models"]["model1"]
    assert model["epochs"] == 1
    assert set(model["history"]) >= {"accuracy", "val_accuracy", "loss", "val_loss"}
    matrix = model["confusion_matrix"]
    assert sum(map(sum, matrix)) == 4  # the 4 test images, each scored once
    assert model["test_accuracy"] == sum(matrix[i][i] for i in range(2)) / 4
    assert Path(model["path"]).is_file() and model["path"].endswith(".keras")
    assert set(first["tasks"].values()) == {"Completed"}
    assert first["best_model"] == "model1"
    assert gc.get_freeze_count() == 0  # what the run froze (catdog.heap) is handed back
    # Prefect's results are JSON in the artifacts folder, never pickles.
    results = [p for p in (artifacts / ".prefect").rglob("*") if p.is_file()]
    results = [p for p in results if "locks" not in p.parts and p.name != "file-hashes.json"]
    assert results
    for path in results:
        text = path.read_text()
        assert "pickle" not in text.lower()
        json.loads(text)

    started = time.perf_counter()
    second = run_flow(dataset_zip, artifacts)
    second_seconds = time.perf_counter() - started
    states = dict(second["tasks"])
    assert {states.pop(task) for task in ALWAYS_RUN} == {"Completed"}
    assert set(states.values()) == {"Cached"}, states
    assert second["models"]["model1"]["history"] == model["history"]
    assert second_seconds < first_seconds

    third = run_flow(dataset_zip, artifacts, epochs=2)
    rerun = {task for task, state in third["tasks"].items() if state == "Completed"}
    assert rerun == {"train_model[model1]", "evaluate_model[model1]"} | ALWAYS_RUN
    assert third["models"]["model1"]["epochs"] == 2


def test_transfer_models_get_images_at_their_own_size(dataset_zip, tmp_path):
    from catdog.evaluation import load_model

    summary = run_flow(
        dataset_zip,
        tmp_path / "artifacts",
        models=["model1", "model4"],
        weights="none",
        transfer_image_size=48,
    )
    stages = {"decode_images[32]", "decode_images[48]", "extract_features[model4]"}
    assert stages <= set(summary["tasks"])
    assert summary["models"]["model1"]["image_size"] == 32
    assert summary["models"]["model4"]["image_size"] == 48
    assert summary["run"]["transfer_image_size"] == 48
    model4 = load_model(summary["models"]["model4"]["path"])
    assert model4.input_shape == (None, 48, 48, 3)


def test_real_dataset_slice(tmp_path):
    if not REAL_ZIP.is_file():
        pytest.skip("the shared dataset is not present")
    summary = run_flow(REAL_ZIP, tmp_path / "artifacts", max_images_per_class=6)
    assert summary["data"]["images"] == 3000
    assert summary["data"]["skipped"] == 0
    assert summary["data"]["counts"]["train"] == {"cats": 6, "dogs": 6}
    assert summary["data"]["classes"] == ["cats", "dogs"]


@pytest.mark.parametrize(
    ("make_data", "expected"),
    [
        (lambda tmp: tmp / "missing.zip", "no such file"),
        (lambda tmp: _write(tmp / "notes.zip", b"hello, not a zip"), "not a zip"),
        (lambda tmp: _zip_without_classes(tmp), "no class folders"),
    ],
)
def test_bad_data_fails_with_one_line_and_exit_2(tmp_path, capsys, make_data, expected):
    artifacts = tmp_path / "artifacts"
    code = main(
        ["--data", str(make_data(tmp_path)), "--models", "model1", "--artifacts", str(artifacts)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and expected in err[0] and err[0].startswith("error: --data")
    assert not artifacts.exists() or not any(artifacts.iterdir())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "model9"], "--models: 'model9': input should be 'model1'"),
        (["--models", ","], "--models: ',': list should have at least 1 item"),
        (["--epochs", "0"], "--epochs: '0': input should be greater than or equal to 1"),
        (["--download-retries", "-1"], "--download-retries: '-1': input should be greater"),
        (["--train-retries", "-1"], "--train-retries: '-1': input should be greater"),
        (["--promote-margin", "1.5"], "--promote-margin: '1.5': input should be less than or"),
        (["--transfer-image-size", "16"], "--transfer-image-size: '16': input should be greater"),
        (["--max-images-per-class", "1"], "--max-images-per-class: '1': input should be greater"),
        (["--refresh", "report"], "--refresh: 'report': input should be 'all', 'download'"),
        (["--precision", "fp8"], "--precision: 'fp8': input should be 'auto'"),
    ],
)
def test_bad_arguments_exit_2_before_any_work(tmp_path, argv, message, capsys, dataset_zip):
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(dataset_zip), *argv, "--artifacts", str(tmp_path / "a")])
    assert exit_info.value.code == 2
    assert f"error: argument {message}" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.h5", None, "does not exist"),
        ("some.bin", b"weights", "not an .h5 file"),
        ("broken.h5", b"not hdf5", "not an HDF5 file"),
    ],
)
def test_bad_weights_file_exits_2_before_any_work(
    tmp_path, capsys, dataset_zip, name, content, message
):
    weights = tmp_path / name
    if content is not None:
        weights.write_bytes(content)
    argv = ["--data", str(dataset_zip), "--models", "model4", "--weights", str(weights)]
    assert main([*argv, "--artifacts", str(tmp_path / "a")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: weights file '{weights}'") and message in line
    assert not (tmp_path / "a").exists()


def test_a_model_without_a_frozen_base_ignores_the_weights_option(tmp_path, dataset_zip):
    argv = ["--data", str(dataset_zip), "--models", "model1", "--epochs", "1"]
    argv += ["--weights", str(tmp_path / "never-read.h5"), "--image-size", "32"]
    assert main([*argv, "--artifacts", str(tmp_path / "a")]) == 0


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _zip_without_classes(tmp: Path) -> Path:
    import zipfile

    archive = tmp / "flat.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("readme.txt", "no images here")
        handle.writestr("photos/a.txt", "still none")
    return archive


def test_an_explicit_precision_trains_anew_instead_of_reusing_another(dataset_zip, tmp_path):
    artifacts = tmp_path / "artifacts"
    run_flow(dataset_zip, artifacts, models=["model2"], precision="float32")
    again = run_flow(dataset_zip, artifacts, models=["model2"], precision="mixed_bfloat16")
    assert again["tasks"]["train_model[model2]"] == "Completed"
