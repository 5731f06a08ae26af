"""A flow run killed mid-training: the next run continues from the last finished epoch."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from tests.conftest import flow_command, flow_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]  # trains via the flow

EPOCHS = 30


def test_killed_run_resumes_at_the_next_epoch(dataset_zip, tmp_path):
    artifacts = tmp_path / "artifacts"
    env = flow_env(tmp_path / "home", PYTHONUNBUFFERED="1")
    command = flow_command(dataset_zip, artifacts, epochs=EPOCHS)
    run = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert run.stdout is not None
    for line in run.stdout:
        if f"model1 epoch 2/{EPOCHS}" in line:
            os.killpg(run.pid, signal.SIGKILL)
            break
    run.communicate(timeout=60)  # reaps it and closes the pipe
    partial = next((artifacts / "04_models/model1").glob(".*.partial"))
    done = len(json.loads((partial / "train-epochs.json").read_text()))
    assert 2 <= done < EPOCHS

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    log = rerun.stdout + rerun.stderr
    assert f"resuming train at epoch {done + 1} of {EPOCHS}" in log
    assert f"model1 epoch 1/{EPOCHS}" not in log
    summary = json.loads((artifacts / "summary.json").read_text())
    assert summary["models"]["model1"]["epochs"] == EPOCHS
    assert len(summary["models"]["model1"]["history"]["val_accuracy"]) == EPOCHS
    assert not partial.exists()
