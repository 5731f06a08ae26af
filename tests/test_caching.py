"""Caching across runs: what reruns when what changes, damaged caches, concurrent runs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from catdog.stages import STAGES
from tests.conftest import (
    ALWAYS_RUN,
    REPO,
    computed,
    copy_of_the_project,
    flow_command,
    flow_env,
    make_dataset,
    run_flow,
    write_image,
    zip_folder,
)
from tests.test_stage_table import add_a_stage, check_the_added_stage

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]
# The stages up to the manifest, from the stage table: what a change of split settings reuses.
DATA_STAGES = {stage.task for stage in STAGES[: 1 + [s.name for s in STAGES].index("manifest")]}
# model1's stages from the split on, on the tests' 32x32 images.
SPLIT_AND_LATER = {
    "split_dataset",
    "count_labels",
    "profile_data",
    "plot_samples",
    "decode_images[32]",
    "train_model[model1]",
    "evaluate_model[model1]",
}


def test_a_seed_change_reruns_the_split_and_later_and_keeps_production_out_of_the_gate(
    dataset_zip, tmp_path
):
    artifacts = tmp_path / "artifacts"
    run_flow(dataset_zip, artifacts)
    registry = json.loads((artifacts / "production/registry.json").read_text())
    summary = run_flow(dataset_zip, artifacts, seed=8)
    assert not computed(summary) & DATA_STAGES
    assert computed(summary) >= SPLIT_AND_LATER
    # The new seed moves the validation/test cut: production selected its epoch on images that
    # are now test images, so the gate does not compare it.
    promotion = summary["promotion"]
    assert promotion["promoted"] is False and promotion["evidence"] is None
    assert promotion["reason"].startswith("not compared: production (model1)")
    after = json.loads((artifacts / "production/registry.json").read_text())
    assert {k: v for k, v in after.items() if k != "history"} == {
        k: v for k, v in registry.items() if k != "history"
    }
    assert [entry["action"] for entry in after["history"]] == ["promote", "keep"]


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
    assert computed(again) == ALWAYS_RUN
    shutil.copy(folder / "train/cats/cats.0.jpg", folder / "train/dogs/extra.jpg")
    (folder / "train/dogs/extra.jpg").write_bytes(
        (folder / "train/dogs/extra.jpg").read_bytes() + b"\0"
    )
    changed = run_flow(folder, artifacts)
    assert "build_manifest" in computed(changed)
    assert changed["data"]["counts"]["train"] == {"cats": 12, "dogs": 13}


def test_one_archive_is_one_entry_a_deleted_file_is_recomputed_and_refresh_reruns(
    dataset_zip, tmp_path
):
    artifacts = tmp_path / "artifacts"
    first = run_flow(dataset_zip, artifacts)
    respelled = dataset_zip.parent / ".." / dataset_zip.parent.name / dataset_zip.name
    copy = tmp_path / "copy-of-tiny.zip"
    shutil.copyfile(dataset_zip, copy)
    for data in (respelled, copy):
        summary = run_flow(data, artifacts)
        assert computed(summary) == ALWAYS_RUN, data

    # A cached stage's file that went missing is recomputed, not served stale.
    model_path = Path(first["models"]["model1"]["path"])
    model_path.unlink()
    again = run_flow(dataset_zip, artifacts)
    assert "train_model[model1]" in computed(again)
    assert computed(again) & DATA_STAGES == set()
    assert model_path.is_file()

    # `--refresh STAGE` recomputes that stage and the later ones.
    refreshed = run_flow(dataset_zip, artifacts, refresh="train")
    assert computed(refreshed) == {"train_model[model1]", "evaluate_model[model1]"} | ALWAYS_RUN


def test_promotion_gate_registry_and_rollback_on_real_runs(dataset_zip, tmp_path, capsys):
    from catdog.__main__ import main as catdog_main

    artifacts = tmp_path / "artifacts"
    first = run_flow(dataset_zip, artifacts)
    assert first["promotion"]["promoted"] is True
    registry = json.loads((artifacts / "production/registry.json").read_text())
    assert registry["model"] == "model1"
    assert registry["epoch"] == first["models"]["model1"]["best_epoch"]
    assert registry["split_hash"] == first["data"]["split_hash"]
    assert registry["data_hash"] == first["data"]["manifest_hash"]
    first_bytes = (artifacts / "production/model.keras").read_bytes()
    assert first_bytes == Path(first["models"]["model1"]["path"]).read_bytes()
    assert catdog_main(["registry", "rollback", "--artifacts", str(artifacts)]) == 2
    assert "nothing before it to roll back to" in capsys.readouterr().err

    kept = run_flow(dataset_zip, artifacts, epochs=2, promote_margin=1.0)
    promotion = kept["promotion"]
    assert promotion["promoted"] is False and "kept production" in promotion["reason"]
    evidence = promotion["evidence"]
    assert evidence["production_accuracy"] == pytest.approx(registry["test_accuracy"])
    candidate = kept["models"]["model1"]
    assert evidence["candidate_accuracy"] == pytest.approx(candidate["test_accuracy"])
    assert f"McNemar p = {evidence['p_value']:.3g}" in promotion["reason"]
    report = Path(kept["run"]["report"]).read_text()
    assert "| candidate | candidate test accuracy | production test accuracy |" in report

    # The gate's record of production's predictions on this split, made all wrong: any
    # candidate that gets one image right is better.
    [predictions] = (artifacts / "production/models").glob("0000-model1.keras.predictions-*")
    count = len(json.loads(predictions.read_text()))
    predictions.write_text(json.dumps([-1] * count))
    promoted = run_flow(dataset_zip, artifacts, epochs=3)
    assert promoted["promotion"]["promoted"] is True, promoted["promotion"]
    assert (artifacts / "production/model.keras").read_bytes() != first_bytes

    assert catdog_main(["registry", "--artifacts", str(artifacts)]) == 0
    listing = capsys.readouterr().out
    assert listing.count("promote") == 2 and listing.count("keep") == 1
    assert catdog_main(["registry", "rollback", "--artifacts", str(artifacts)]) == 0
    assert (artifacts / "production/model.keras").read_bytes() == first_bytes
    restored = json.loads((artifacts / "production/registry.json").read_text())
    assert restored["run_id"] == registry["run_id"]
    assert [e["action"] for e in restored["history"]] == ["promote", "keep", "promote", "rollback"]


def test_production_is_remeasured_at_its_own_input_size_on_new_data(tmp_path):
    import numpy as np

    from catdog.data.images import load_images
    from catdog.data.records import Manifest
    from catdog.evaluation import load_model, score
    from catdog.layout import STAGE_DIRS

    folder = make_dataset(tmp_path / "photos")
    artifacts = tmp_path / "artifacts"
    first = run_flow(folder, artifacts)  # production: model1 on 32x32 images
    # New images join every split; the images production trained on keep theirs, so the new
    # test split holds none of them and the gate can score production on it.
    for number, split in enumerate(("train", "validation")):
        for index, name in enumerate(("cats", "dogs")):
            for i in range(12):  # enough that validation's test share grows
                path = folder / split / name / f"new.{i}.jpg"
                write_image(path, 900 + 100 * number + 20 * index + i, bright=index == 1)
    summary = run_flow(folder, artifacts, image_size=40, promote_margin=1.0)
    assert summary["models"]["model1"]["image_size"] == 40
    assert summary["promotion"]["promoted"] is False
    assert "not compared" not in summary["promotion"]["reason"]

    split_dir = next(d for d in summary["artifacts_used"] if d.startswith(STAGE_DIRS["split"]))
    manifest = Manifest.load(artifacts / split_dir / "split.json")
    test = manifest.in_split("test")
    production = load_model(artifacts / "production/model.keras")
    images = load_images(manifest.paths(test), 32).astype(np.float32)
    expected = score(production.predict(images, verbose=0), [e.label for e in test], ["c", "d"])
    assert summary["promotion"]["production_accuracy"] == pytest.approx(expected["accuracy"])
    # Production's predictions are kept per image: it predicted only the images that are new
    # to the test split.
    first_dir = next(d for d in first["artifacts_used"] if d.startswith(STAGE_DIRS["split"]))
    earlier = Manifest.load(artifacts / first_dir / "split.json")
    before = {entry.sha256 for entry in earlier.in_split("test")}
    new_in_test = [entry for entry in test if entry.sha256 not in before]
    assert 0 < len(new_in_test) < len(test)
    assert summary["promotion"]["evidence"]["production_computed"] == len(new_in_test)


def _flow_subprocess(
    data: Path,
    artifacts: Path,
    home: Path,
    pythonpath: Path | None = None,
    models: str = "model1",
    *extra: str,
):
    env = flow_env(home, **({"PYTHONPATH": str(pythonpath)} if pythonpath else {}))
    command = flow_command(data, artifacts, epochs=1, checkout=pythonpath or REPO, models=models)
    command += extra
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=home.parent,
    )


def _finish(run: subprocess.Popen) -> None:
    """Wait for a flow subprocess; it must succeed (its output is the failure message)."""
    output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output


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


def _first_run_from_a_copy(dataset_zip: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the project, and the artifacts of a first run of it."""
    checkout = copy_of_the_project(tmp_path / "checkout")
    artifacts = tmp_path / "artifacts"
    first = _flow_subprocess(dataset_zip, artifacts, tmp_path / "home", checkout)
    _finish(first)
    return checkout, artifacts


def test_code_edits_rerun_their_stages_and_new_models_and_stages_run(dataset_zip, tmp_path):
    checkout, artifacts = _first_run_from_a_copy(dataset_zip, tmp_path)

    # A library module: the stages whose code reaches it rerun, the earlier ones do not. And a
    # model added to the catalog (one entry plus its builder) trains through the flow.
    split_module = checkout / "catdog/data/split.py"
    source = split_module.read_text()
    split_module.write_text(
        source.replace(
            "def split_manifest(",
            "def _unused() -> None:\n    return None\n\n\ndef split_manifest(",
            1,
        )
    )
    (checkout / "catdog/tiny.py").write_text(TINY_BUILDER)
    catalog_module = checkout / "catdog/catalog.py"
    source = catalog_module.read_text()
    catalog_module.write_text(source.replace("\n)\n\nCATALOG", TINY_ENTRY, 1))
    # And a stage: its entry in the table with its record, its task, the flow's line.
    add_a_stage(checkout)
    # Two models whose heads train on features of the frozen base: one entry more each.
    run = _flow_subprocess(
        dataset_zip,
        artifacts,
        tmp_path / "home",
        checkout,
        "tiny,model1,model4,model4_again",
        *("--weights", "none", "--transfer-image-size", "32"),
    )
    _finish(run)
    summary = json.loads((artifacts / "summary.json").read_text())
    assert not computed(summary) & DATA_STAGES
    assert "split_dataset" in computed(summary)
    assert set(summary["models"]) == {"tiny", "model1", "model4", "model4_again"}
    features = {}
    for name in ("model4", "model4_again"):
        assert summary["tasks"][f"extract_features[{name}]"] == "Completed"
        config = Path(summary["models"][name]["path"]).with_name("config.json")
        features[name] = json.loads(config.read_text())["inputs"]["features"]
        assert features[name] in {Path(d).name for d in summary["artifacts_used"]}
    assert features["model4"] != features["model4_again"]
    tiny = summary["models"]["tiny"]
    assert tiny["image_size"] == 32 and tiny["epochs"] == 1
    assert tiny["total_params"] == (3 * 3 * 3 * 4 + 4) + (4 * 2 + 2)
    matrix, tests = tiny["confusion_matrix"], sum(summary["data"]["counts"]["test"].values())
    assert Path(tiny["path"]).is_file() and sum(map(sum, matrix)) == tests
    assert tiny["test_accuracy"] == (matrix[0][0] + matrix[1][1]) / tests
    assert summary["tasks"]["train_model[tiny]"] == "Completed"
    assert summary["tasks"]["evaluate_model[tiny]"] == "Completed"
    assert summary["tasks"]["tally_images"] == "Completed"
    check_the_added_stage(artifacts, summary)

    # A task's own body: that stage and the later ones rerun. A comment changes nothing.
    data_tasks = checkout / "tasks/data.py"
    source = data_tasks.read_text()
    anchor = "    from catdog.data.split import split_manifest\n"  # in split_dataset's body
    assert source.count(anchor) == 1
    data_tasks.write_text(source.replace(anchor, anchor + "    seed = int(seed)\n", 1))
    comment_only = checkout / "tasks/training.py"
    comment_only.write_text(
        comment_only.read_text().replace("    logger = ", "    # noted\n    logger = ", 1)
    )
    _finish(_flow_subprocess(dataset_zip, artifacts, tmp_path / "home", checkout))
    latest = _run_summaries(artifacts)[-1]
    # The sample figures, keyed by the images they show, stay: the split's images are the same.
    rerun = (SPLIT_AND_LATER - {"plot_samples"}) | ALWAYS_RUN | {"tally_images"}
    assert computed(latest) == rerun

    # The data checks' code: they rerun; the split, which only reads the groups they found,
    # and everything trained on it do not.
    checks_module = checkout / "catdog/data/quality.py"
    checks_module.write_text(checks_module.read_text() + "\n\ndef _unused() -> None:\n    pass\n")
    _finish(_flow_subprocess(dataset_zip, artifacts, tmp_path / "home", checkout))
    latest = _run_summaries(artifacts)[-1]
    assert computed(latest) == {"inspect_images", "profile_data"} | ALWAYS_RUN
    assert latest["tasks"]["tally_images"] == "Cached"


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
    ModelSpec(
        "model4_again",
        "model4's architecture, for tests: a second head trained on cached features",
        "catdog.models:make_model4",
        input_size="transfer_image_size",
        frozen_base=True,
        trains_on_features=True,
        settings=(*_COMMON_SETTINGS, "feature_views", "dropout"),
    ),
)

CATALOG"""


def test_two_runs_at_once_on_a_fresh_folder_twice_over(dataset_zip, tmp_path):
    """Races between two runs' first writes, repeated: the lock-file race this found once in
    ten rounds has its own deterministic test (tests/test_locks.py)."""
    import threading

    for round_ in range(2):
        artifacts = tmp_path / f"artifacts{round_}"
        errors: list[BaseException] = []

        def one_run(artifacts: Path = artifacts, errors: list = errors) -> None:
            try:
                run_flow(dataset_zip, artifacts)
            except BaseException as error:  # reported below, in the test's thread
                errors.append(error)

        threads = [threading.Thread(target=one_run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, f"round {round_}: {errors}"
        summaries = _run_summaries(artifacts)
        assert len(summaries) == 2
        registry = json.loads((artifacts / "production/registry.json").read_text())
        assert sorted(e["run_id"] for e in registry["history"]) == sorted(
            s["run"]["id"] for s in summaries
        )
        # The second at the gate judged against what the first had installed: the same model.
        assert [e["action"] for e in registry["history"]] == ["promote", "keep"]
        assert not list(artifacts.rglob("*.tmp"))
