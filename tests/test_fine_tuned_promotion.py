"""The fine-tuned MobileNetV2 (with model4, which it starts from) on a slice of the real
photos, as a user asks for it, under bf16 where the CPU has it and under float32: the gate's
best is promoted with both exports checked, and `predict` answers from it. (model1-model3 on
real photos: tests/test_default_job.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from catdog.layout import Layout
from catdog.registry import read as read_registry
from catdog.serving import ServingSpec
from tests.conftest import REAL_WEIGHTS, REAL_ZIP, flow_env, real_flow_command

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

# Past the first 50 validation photos of each class that the slice uses.
PHOTOS = {"cat.2499.jpg": "cats", "dog.2499.jpg": "dogs"}


# Where the CPU picks the precision (bf16 here when it has it: the export rebuilt in float32
# and judged by classes), and under float32 (the export served as it is).
@pytest.mark.parametrize("precision", ["auto", "float32"])
def test_the_fine_tuned_model_on_a_real_slice_promotes_its_best_with_checked_exports(
    tmp_path, precision
):
    if not (REAL_ZIP.is_file() and REAL_WEIGHTS.is_file()):
        pytest.skip("../shared's dataset and weights are not present")
    artifacts = tmp_path / "artifacts"
    command = real_flow_command(
        artifacts,
        *("--models", "model4_finetune", "--max-images-per-class", "50"),
        *("--epochs", "1", "--finetune-epochs", "3", "--precision", precision),
    )
    run = subprocess.run(
        command, env=flow_env(tmp_path / "home"), capture_output=True, text=True, timeout=1200
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((artifacts / "summary.json").read_text())
    promotion = summary["promotion"]
    assert promotion["promoted"], promotion["reason"]
    assert promotion["candidate"] == summary["best_model"]
    check = promotion["export_check"]
    assert check["passed"] and [r["runtime"] for r in check["runtimes"]] == ["litert", "savedmodel"]
    assert all(r["passed"] and r["max_difference"] <= 1e-4 for r in check["runtimes"])
    production = read_registry(Layout.at(artifacts)).production
    assert production.model == summary["best_model"]
    served = ServingSpec.load(artifacts / production.exports)
    if served.precision == "float32":  # served as it is, compared with it directly
        assert check["precision"] is None
    else:  # its float32 rebuild judged by classes and accuracy
        assert check["precision"]["trained_precision"] == served.precision
        assert check["precision"]["passed"]
    if precision == "float32":
        assert served.precision == "float32"
    print(f"{precision}: promoted {production.model}, trained under {served.precision}")

    photos = tmp_path / "photos"
    photos.mkdir()
    with zipfile.ZipFile(REAL_ZIP) as archive:
        for name in PHOTOS:
            member = next(
                n for n in archive.namelist() if n.endswith(f"/validation/{name[:3]}s/{name}")
            )
            (photos / name).write_bytes(archive.read(member))
    result = subprocess.run(
        [sys.executable, "-m", "catdog", "predict", str(photos), "--artifacts", str(artifacts)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(production, litert)" in result.stderr
    rows = [row.split(",") for row in result.stdout.strip().splitlines()[1:]]  # a CSV table
    said = {Path(path).name: label for path, label, _ in rows}
    assert said == PHOTOS
