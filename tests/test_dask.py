"""The flow on a real Dask engine: a `dask scheduler` and two `dask worker` processes started
here from the project's own environment, and the temporary cluster of `--runner dask`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import (
    ALWAYS_RUN,
    ONE_TF_THREAD,
    flow_command,
    flow_env,
    free_port,
    task_run_logs,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

MODELS = "model1,model2"
STAGES_RERUN_EVERY_TIME = ALWAYS_RUN


def _run(command: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        env=flow_env(tmp_path / "home", **env),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )


def _summary(artifacts: Path) -> dict:
    return json.loads((artifacts / "summary.json").read_text())


def _stage_states(summary: dict) -> set[str]:
    return {
        state for task, state in summary["tasks"].items() if task not in STAGES_RERUN_EVERY_TIME
    }


def _layout(artifacts: Path) -> set[str]:
    """The artifacts' file names, with content-addressed keys, per-image packs' names (random)
    and TensorBoard's event file names (a time and a pid) left out."""
    names = set()
    for path in artifacts.rglob("*"):
        parts = path.relative_to(artifacts).parts
        if (
            not path.is_file()
            or ".prefect" in parts
            or "05_reports" in parts
            or path.name.startswith("events.out.tfevents")
        ):
            continue
        if parts[0] == "pieces":
            parts = (*parts[:-1], f"*{path.suffix}")
        names.add("/".join(part.split("-")[0] for part in parts))
    return names


def test_a_running_cluster_and_a_temporary_one_train_as_the_default_runner_does(
    dataset_zip, tmp_path, dask_cluster
):
    on_cluster, local = tmp_path / "on-cluster", tmp_path / "local"
    first = _run(
        [
            *flow_command(dataset_zip, on_cluster, epochs=1, models=MODELS),
            "--dask-address",
            dask_cluster.address,
        ],
        tmp_path,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    summary = _summary(on_cluster)
    for worker in (model["worker"] for model in summary["models"].values()):
        assert worker["host"] == socket.gethostname()
        assert worker["pid"] in dask_cluster.worker_pids, (worker, dask_cluster.worker_pids)
    assert set(summary["models"]) == {"model1", "model2"}
    assert _stage_states(summary) == {"Completed"}

    # The same artifacts, file for file, and the same numbers, bit for bit, as the default
    # runner gives with as many TensorFlow threads as a worker has.
    local_command = flow_command(dataset_zip, local, epochs=1, models=MODELS)
    sequential = _run(local_command, tmp_path, **ONE_TF_THREAD)
    assert sequential.returncode == 0, sequential.stdout + sequential.stderr
    assert _layout(on_cluster) == _layout(local)
    for name in ("model1", "model2"):
        assert summary["models"][name]["history"] == _summary(local)["models"][name]["history"]

    # `--runner dask` on what the default runner computed: every stage's cache key, computed
    # in another process, finds its entry; the retrained models come from worker processes
    # that are gone when the run is; Dask's own start-up lines stay quiet.
    # Its temporary cluster is private: the scheduler the run names in its log refuses a client
    # without the run's credentials, while the run goes on.
    command = [*local_command, "--runner", "dask", "--workers", "2", "--refresh", "train"]
    env = flow_env(tmp_path / "home")
    run = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert run.stdout is not None
    lines = []
    for line in run.stdout:
        lines.append(line)
        if found := re.search(r"Dask scheduler of this run at (tls://\S+)", line):
            from distributed import Client, Security

            address = found.group(1)
            # Credentials of its own (not the run's), and none at all over plain TCP.
            for probe, security in ((address, Security.temporary()), (address[3:], None)):
                with pytest.raises((OSError, TimeoutError)):
                    Client(
                        f"tcp{probe}" if security is None else probe,
                        timeout=3,
                        security=security,
                        set_as_default=False,
                    )
            break
    output = "".join(lines) + run.communicate(timeout=600)[0]
    assert run.returncode == 0, output
    assert found, output
    assert len(re.findall(r"Dask scheduler of this run at", output)) == 1
    assert "dashboard" not in output
    again = _summary(local)
    assert set(again["models"]) == {"model1", "model2"}
    refreshed = ("train_model", "evaluate_model", *STAGES_RERUN_EVERY_TIME)
    assert again["tasks"] == {
        task: "Completed" if task.startswith(refreshed) else "Cached" for task in again["tasks"]
    }
    pids = {model["worker"]["pid"] for model in again["models"].values()}
    assert run.pid not in pids
    for pid in pids:  # the cluster went with the run
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "distributed.worker" not in output


def _training_holder(artifacts: Path) -> int | None:
    """The pid that holds model1's training lock, once it has finished two epochs."""
    partial = next((artifacts / "04_models/model1").glob(".*.partial"), None)
    epochs = partial / "train-epochs.json" if partial else None
    try:
        if not epochs or len(json.loads(epochs.read_text())) < 2:
            return None
        lock = next((artifacts / ".prefect/locks").glob("train-*.lock"))
        owner = json.loads(lock.read_text())["process"]
    except (OSError, ValueError, KeyError, StopIteration):
        return None
    return int(owner.split(":")[1])  # "host:pid:start"


def test_a_worker_killed_mid_training_resumes_on_the_other(dataset_zip, tmp_path, dask_cluster):
    artifacts = tmp_path / "artifacts"
    epochs = 40
    command = [
        *flow_command(dataset_zip, artifacts, epochs=epochs, models="model1"),
        "--train-retries",
        "1",
        "--dask-address",
        dask_cluster.address,
    ]
    env = flow_env(tmp_path / "home")
    run = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 300
    while (holder := _training_holder(artifacts)) is None:
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0]
        time.sleep(0.05)
    assert holder in dask_cluster.worker_pids
    os.kill(holder, signal.SIGKILL)
    done = len(json.loads(next(artifacts.rglob("train-epochs.json")).read_text()))
    survivor = dask_cluster.worker_pids - {holder}

    output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output
    model = _summary(artifacts)["models"]["model1"]
    assert model["worker"]["pid"] in survivor
    assert model["epochs"] == epochs
    assert len(model["history"]["val_accuracy"]) == epochs
    # It went on from where the killed worker stopped, and said so in the UI, under the task.
    logs = task_run_logs(_summary(artifacts)["run"]["id"], "train_model[model1]")
    assert f"resuming train at epoch {done + 1} of {epochs}" in logs
    assert f"model1 epoch {done + 1}/{epochs}" in logs


def test_a_cluster_without_a_lasting_prefect_api_is_refused_before_any_work(dataset_zip, tmp_path):
    """The README's cluster recipe needs `prefect server start`: a run's own temporary API goes
    with the run, and the cluster's long-lived workers would report to it on the next run."""
    artifacts = tmp_path / "artifacts"
    with socket.create_server(("127.0.0.1", 0)) as scheduler:  # answers like a scheduler
        address = f"tcp://127.0.0.1:{scheduler.getsockname()[1]}"
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home")}
        env.pop("PREFECT_API_URL", None)
        result = subprocess.run(
            [*flow_command(dataset_zip, artifacts, epochs=1), "--dask-address", address],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and "need a Prefect server that outlives this run" in errors[0]
    assert "prefect server start" in errors[0] and "PREFECT_API_URL" in errors[0]
    assert not artifacts.exists()


def test_an_unreachable_address_or_no_workers_stops_before_any_work(dataset_zip, tmp_path):
    artifacts = tmp_path / "artifacts"
    command = flow_command(dataset_zip, artifacts, epochs=1)
    closed = f"tcp://127.0.0.1:{free_port()}"
    for extra, expected in (
        (["--dask-address", closed], f"--dask-address {closed}: no Dask scheduler answers"),
        (["--runner", "dask", "--workers", "0"], "--workers: '0': must be a whole number"),
    ):
        result = _run([*command, *extra], tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and expected in errors[0], result.stderr
        assert not artifacts.exists()
