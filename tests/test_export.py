"""The production model in the formats people serve: every model exports and passes its check
in fresh processes; a corrupted export is caught and keeps production; rollback brings the
exports back; the SavedModel serves without catdog; `predict` runs on LiteRT."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from catdog import catalog, models
from catdog.candidates import Candidate
from catdog.evaluation import softmax
from catdog.export import TOLERANCE, check_export, export_checked, export_model, serving_model
from catdog.gate import promote
from catdog.layout import Layout
from catdog.registry import read as read_registry
from catdog.registry import rollback
from catdog.serving import LITERT_FILE, SAVED_MODEL_DIR, SERVING_FILE, ServingSpec
from catdog.stage_records import Policy
from catdog.training import dtype_policy
from tests.builders import split_facts

pytestmark = [pytest.mark.slow]

SIDE = 32


def _model(name: str, seed: int = 1, policy: str | None = None):
    # bf16 where the catalog allows it, as `auto` trains it on hardware with bf16: the export
    # is rebuilt in float32 then.
    policy = policy or ("mixed_bfloat16" if catalog.spec(name).bfloat16 else "float32")
    with dtype_policy(policy, name):
        return models.build_model(name, (SIDE, SIDE, 3), 2, weights=None, seed=seed)


def _images(folder: Path, count: int = 12, seed: int = 0) -> tuple[Path, np.ndarray]:
    images = np.random.default_rng(seed).integers(0, 256, (count, SIDE, SIDE, 3), np.uint8)
    path = folder / "images.npy"
    np.save(path, images)
    return path, images


def _probabilities(model, images: np.ndarray) -> np.ndarray:
    return softmax(np.asarray(model.predict(images.astype(np.float32), verbose=0))).astype(
        np.float32
    )


@pytest.mark.parametrize("name", catalog.MODEL_NAMES)
def test_every_model_exports_and_passes_its_check_in_fresh_processes(tmp_path, name):
    model = _model(name)
    images_path, images = _images(tmp_path)
    check = export_checked(
        model, tmp_path / "export", ["cats", "dogs"], images_path, _probabilities(model, images)
    )
    assert (tmp_path / "export" / LITERT_FILE).is_file()
    assert (tmp_path / "export" / SAVED_MODEL_DIR / "saved_model.pb").is_file()
    spec = ServingSpec.load(tmp_path / "export")
    served = json.loads((tmp_path / "export" / SERVING_FILE).read_text())
    assert served["classes"] == ["cats", "dogs"] and served["image_size"] == SIDE
    trained = "mixed_bfloat16" if catalog.spec(name).bfloat16 else "float32"
    assert spec.precision == trained and spec.tolerance == TOLERANCE
    assert check.passed, check.reason()
    assert [run.runtime for run in check.runtimes] == ["litert", "savedmodel"]
    assert all(run.other_class == 0 and run.max_difference <= TOLERANCE for run in check.runtimes)
    if trained == "float32":  # served as it is: the exports were compared with it directly
        assert check.precision is None
    else:
        assert check.precision.trained_precision == trained and check.precision.passed


def _trained(policy: str, folder: Path):
    """model2 trained to tell bright images from dark ones: confident answers that depend on
    the pixels, so that a served model which sees other pixels gives other classes."""
    model = _model("model2", policy=policy)
    rng = np.random.default_rng(3)
    labels = np.arange(64) % 2
    images = np.where(labels[:, None, None, None] == 1, 200, 40) + rng.integers(
        -30, 30, (64, SIDE, SIDE, 3)
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(images.astype(np.float32), labels, epochs=8, batch_size=16, verbose=0)
    path = folder / "images.npy"
    np.save(path, images.astype(np.uint8))
    return model, path, images.astype(np.uint8), labels


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "float32"])
@pytest.mark.parametrize("broken", ["augmentation left on", "wrong preprocessing"])
def test_a_served_model_that_is_not_the_trained_one_fails_its_check(
    tmp_path, monkeypatch, policy, broken
):
    """The model the exports are made from is not the one trained and evaluated: caught at
    both precisions."""
    from catdog import export

    model, images_path, images, labels = _trained(policy, tmp_path)
    trained = _probabilities(model, images)
    assert np.mean(trained.argmax(axis=1) == labels) > 0.9
    made = export.serving_model

    def wrong(of):
        served = made(of)
        inputs = keras.Input((SIDE, SIDE, 3), name="image")
        if broken == "wrong preprocessing":  # scaled to 0..1 on the way in
            return keras.Model(inputs, served(keras.layers.Rescaling(1 / 255)(inputs)))
        # training=True: the augmentation draws, the batch normalization uses batch statistics
        inner = served.layers[1]
        logits = inner(inputs, training=True)
        return keras.Model(inputs, keras.layers.Softmax(dtype="float32")(logits))

    monkeypatch.setattr(export, "serving_model", wrong)
    check = export_checked(
        model, tmp_path / "export", ["cats", "dogs"], images_path, trained, labels
    )
    assert not check.passed
    if broken == "augmentation left on":  # it draws anew in every runtime
        assert not all(run.passed for run in check.runtimes)
    elif policy == "float32":  # the exports disagree with the trained model itself
        assert not any(run.passed for run in check.runtimes) and check.precision is None
    else:  # the exports are what the float32 rebuild computes, and that is not the model
        assert all(run.passed for run in check.runtimes) and not check.precision.passed
        assert check.precision.changed > check.precision.near_ties


def test_a_corrupted_export_fails_its_check(tmp_path):
    model = _model("model2")
    images_path, images = _images(tmp_path)
    reference = np.asarray(serving_model(model).predict(images.astype(np.float32), verbose=0))
    export_model(model, tmp_path / "good", ["cats", "dogs"])
    # Another model's weights in the LiteRT file: it runs, and says other things.
    export_model(_model("model2", seed=99), tmp_path / "other", ["cats", "dogs"])
    wrong = tmp_path / "wrong"
    shutil.copytree(tmp_path / "good", wrong)
    shutil.copy(tmp_path / "other" / LITERT_FILE, wrong / LITERT_FILE)
    check = check_export(wrong, images_path, reference)
    assert not check.passed
    litert, savedmodel = check.runtimes
    assert not litert.passed and litert.max_difference > check.tolerance and savedmodel.passed
    # A cut-off file does not load at all; the other runtime still runs in the same process.
    (wrong / LITERT_FILE).write_bytes((tmp_path / "good" / LITERT_FILE).read_bytes()[:1000])
    check = check_export(wrong, images_path, reference)
    assert not check.passed and check.runtimes[0].problem and check.runtimes[1].passed
    assert "litert did not run" in check.reason()


LABELS = [0, 1] * 6


def test_the_gate_ships_only_checked_exports_and_rollback_brings_them_back(tmp_path):
    """The gate on real models and real exports: a candidate whose exports fail their check
    is not promoted, and production keeps its model and its exports."""
    layout = Layout.at(tmp_path / "artifacts")
    images_path, images = _images(tmp_path, count=len(LABELS))
    run = {"id": "r"}

    def candidate(name: str, seed: int, right: int) -> tuple[Candidate, object]:
        model = _model("model2", seed=seed)
        path = tmp_path / f"{name}.keras"
        model.save(path)
        predictions = [y if i < right else 1 - y for i, y in enumerate(LABELS)]
        return Candidate(name, str(path), 1, 0.6, right / 12, predictions, SIDE, "c"), model

    def shipping(model, corrupt: bool = False):
        def ship(chosen: Candidate, folder: Path):
            trained = _probabilities(model, images)
            check = export_checked(model, folder, ["cats", "dogs"], images_path, trained, LABELS)
            if corrupt:  # a LiteRT file of another model, checked again
                export_model(_model("model2", seed=77), folder / "other", ["cats", "dogs"])
                shutil.copy(folder / "other" / LITERT_FILE, folder / LITERT_FILE)
                served = serving_model(model).predict(images.astype(np.float32), verbose=0)
                check = check_export(folder, images_path, np.asarray(served))
            return check

        return ship

    first, first_model = candidate("first", 1, 6)
    assert promote(
        layout, first, split_facts(LABELS), Policy(0.0), run, ship=shipping(first_model)
    ).promoted
    shipped = (layout.production_export / LITERT_FILE).read_bytes()

    better, better_model = candidate("better", 2, 9)
    decision = promote(
        layout, better, split_facts(LABELS), Policy(0.0), run, ship=shipping(better_model, True)
    )
    assert not decision.promoted and "exports failed their check" in decision.reason
    assert decision.export_check.passed is False
    registry = read_registry(layout)
    assert registry.production.model == "first" and registry.history[-1]["action"] == "keep"
    assert (layout.production_export / LITERT_FILE).read_bytes() == shipped
    assert not list(layout.production_dir.glob("models/.*"))  # nothing half-written kept

    def no_space(chosen: Candidate, folder: Path):
        folder.mkdir()
        (folder / "half-written").write_bytes(b"x")
        raise OSError(28, "No space left on device")

    decision = promote(layout, better, split_facts(LABELS), Policy(0.0), run, ship=no_space)
    assert not decision.promoted and "No space left on device" in decision.reason
    assert read_registry(layout).production.model == "first"
    assert not list(layout.production_dir.glob("models/.*"))

    assert promote(
        layout, better, split_facts(LABELS), Policy(0.0), run, ship=shipping(better_model)
    ).promoted
    assert (layout.production_export / LITERT_FILE).read_bytes() != shipped
    rollback(layout)
    assert read_registry(layout).production.model == "first"
    assert (layout.production_export / LITERT_FILE).read_bytes() == shipped


@pytest.mark.usefixtures("prefect_api")
def test_a_promoted_run_serves_without_catdog_and_predicts_on_litert(dataset_zip, tmp_path):
    from tests.conftest import run_flow

    artifacts = tmp_path / "artifacts"
    # float32: a bf16-trained model's exports may turn a near-tie the other way (see README).
    summary = run_flow(
        dataset_zip, artifacts, models=["model1", "model2"], export=True, precision="float32"
    )
    layout = Layout.at(artifacts)
    registry = read_registry(layout)
    assert registry.production.exports and (layout.production_export / LITERT_FILE).is_file()
    assert summary["promotion"]["export_check"]["passed"] is True
    best = summary["best_model"]
    evaluation = Path(summary["models"][best]["evaluation_dir"])
    arrays = next(
        artifacts / d for d in summary["artifacts_used"] if d.startswith("03_splits/arrays/")
    )

    # TensorFlow Serving's view of the SavedModel: TensorFlow alone, no catdog in the process.
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        f"serve = tf.saved_model.load({str(layout.production_export / SAVED_MODEL_DIR)!r})"
        ".signatures['serve']\n"
        f"images = np.load({str(arrays / 'test_x.npy')!r}).astype('float32')\n"
        "(probabilities,) = serve(tf.constant(images)).values()\n"
        "assert not any(name.startswith('catdog') for name in sys.modules)\n"
        "print(np.asarray(probabilities).argmax(axis=1).tolist())\n"
    )
    served = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert served.returncode == 0, served.stderr[-2000:]
    classes = json.loads(served.stdout.strip().splitlines()[-1])
    expected = np.load(evaluation / "probabilities.npy").argmax(axis=1).tolist()
    assert classes == expected

    # predict: LiteRT by default, no TensorFlow in the process; Keras on request; same classes.
    photos = dataset_zip.parent / "src" / "validation"
    said, imported = {}, {}
    for runtime in ("auto", "keras"):
        argv = ["predict", str(photos), "--artifacts", str(artifacts), "--runtime", runtime]
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from catdog.__main__ import main; code = main(sys.argv[1:]); "
                "print('tensorflow' in sys.modules, file=sys.stderr); sys.exit(code)",
                *argv,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        said[runtime] = [row.split(",")[1] for row in result.stdout.strip().splitlines()[1:]]
        imported[runtime] = result.stderr.strip().splitlines()[-1]
        assert ("litert" if runtime == "auto" else "keras") in result.stderr
    assert said["auto"] == said["keras"] and len(said["auto"]) == 20
    assert imported == {"auto": "False", "keras": "True"}
