"""No production model yet is a state, not a crash: a registry that holds only refusals, read by
`registry`, `predict` and `export` on the command line, as a user meets it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from catdog.layout import Layout
from catdog.registry import Registry, RegistryError, read, record
from tests.conftest import write_image


def _refusals_only(artifacts: Path) -> Layout:
    layout = Layout.at(artifacts)
    for number in range(2):
        entry = {
            "time": f"2026-12-0{number + 1}T00:00:00+00:00",
            "action": "keep",
            "candidate": "model4_finetune",
            "candidate_epoch": 3,
            "reason": "kept production: its exports failed their check",
            "rule": "exports",
        }
        record(layout, read(layout), entry, None)
    return layout


def _catdog(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "catdog", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return errors[0]


def test_a_registry_of_refusals_has_no_production(tmp_path):
    layout = _refusals_only(tmp_path / "artifacts")
    registry = read(layout)
    assert registry.production is None and registry.promotions == 0
    assert [entry["action"] for entry in registry.history] == ["keep", "keep"]
    assert not layout.production_model.exists()


def test_registry_lists_the_refusals_and_says_there_is_no_production(tmp_path):
    _refusals_only(tmp_path / "artifacts")
    result = _catdog("registry", "--artifacts", str(tmp_path / "artifacts"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("keep") == 2 and "(current)" not in result.stdout
    assert "no production model: none of these 2 decisions promoted a model" in result.stdout
    rollback = _catdog(
        "registry", "rollback", "--artifacts", str(tmp_path / "artifacts"), cwd=tmp_path
    )
    assert rollback.returncode == 2
    assert "no production model" in _one_error_line(rollback)


def test_an_unreadable_registry_is_one_line_naming_it(tmp_path):
    layout = _refusals_only(tmp_path / "artifacts")
    layout.registry.write_text("{ not json")
    with pytest.raises(RegistryError, match=r"registry\.json: not a readable catdog registry"):
        read(layout)
    result = _catdog("registry", "--artifacts", str(layout.root), cwd=tmp_path)
    assert result.returncode == 2 and str(layout.registry) in _one_error_line(result)


@pytest.mark.parametrize("command", ["predict", "export"])
def test_without_production_or_a_run_predict_and_export_end_in_one_line(tmp_path, command):
    _refusals_only(tmp_path / "artifacts")
    image = write_image(tmp_path / "cat.jpg", 1)
    argv = [str(image)] if command == "predict" else ["--out", str(tmp_path / "export")]
    result = _catdog(command, *argv, "--artifacts", str(tmp_path / "artifacts"), cwd=tmp_path)
    assert result.returncode == 2
    line = _one_error_line(result)
    assert "no production model" in line and "train one" in line
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "export"])
def test_without_production_predict_and_export_use_the_last_runs_best_and_say_so(tmp_path, command):
    from catdog import models

    layout = _refusals_only(tmp_path / "artifacts")
    model_path = tmp_path / "artifacts" / "04_models" / "model1" / "train-x" / "model.keras"
    model_path.parent.mkdir(parents=True)
    models.build_model("model1", (32, 32, 3), 2, weights=None, seed=1).save(model_path)
    layout.summary.write_text(
        json.dumps(
            {
                "best_model": "model1",
                "models": {"model1": {"path": str(model_path)}},
                "data": {"classes": ["cats", "dogs"]},
            }
        )
    )
    image = write_image(tmp_path / "cat.jpg", 1, size=(32, 32))
    argv = [str(image)] if command == "predict" else ["--out", str(tmp_path / "export")]
    result = _catdog(command, *argv, "--artifacts", str(layout.root), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    said = result.stderr if command == "predict" else result.stdout
    assert "no production model in" in said and "the last run's best" in said
    if command == "predict":
        path, label, _ = result.stdout.strip().split("\t")
        assert path == str(image) and label in ("cats", "dogs")
    else:
        assert (tmp_path / "export" / "model.tflite").is_file()
    assert read(layout) == Registry(None, read(layout).history)  # nothing promoted meanwhile
