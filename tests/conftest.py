"""Shared fixtures: a Prefect test API, and small generated image datasets as real files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from catdog.stages import STAGES
from tests.builders import make_dataset, write_image, zip_folder
from tests.http_site import Site, serving

__all__ = ["make_dataset", "write_image", "zip_folder"]  # the suite imports them from here too

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# As flows/train_flow.py: library lines logged outside a flow run stay in the terminal.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

# Prefect configures its logging when `prefect.main` is first imported, and its console handler
# keeps the sys.stderr of that moment. Imported first inside a test that captures stderr
# (capsys), it would write to that test's closed stream in every later test of the process.
import prefect.main  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_ZIP = SHARED / "data" / "cats_and_dogs_filtered.zip"
REAL_WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first: spread over the test processes from the start, they leave the quick
    ones to even out the end, instead of one long test running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """Prefect's real engine and API, on a throwaway database."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def dataset_zip(tmp_path: Path) -> Path:
    """The official layout in miniature, nested one level down as in the real archive."""
    folder = make_dataset(tmp_path / "src")
    return zip_folder(folder, tmp_path / "tiny.zip", prefix="tiny_filtered/")


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with serving(tmp_path / "site") as server:
        yield server


def publish(site_folder: Path, tmp_path: Path, name: str, train: int, seed: int) -> Path:
    source = make_dataset(tmp_path / f"src-{name}-{train}", train=train, validation=6, seed=seed)
    staged = zip_folder(source, tmp_path / f"{name}-{train}.zip")
    shutil.copy(staged, site_folder / name)
    return site_folder / name


# ----------------------------------------------------------------------------- flow runs

# Exports on promotion have tests of their own (test_export.py); the other runs skip them, a
# few seconds each.
SMALL = {"image_size": 32, "batch_size": 8, "seed": 7, "export": False}
# The stages every run runs, cached or not: the data checks, the promotion gate and the report
# (the stage table's uncached stages, but the proposal, which runs only when approval is asked).
ALWAYS_RUN = {stage.task for stage in STAGES if not stage.cached and stage.name != "propose"}


def run_flow(data: Path, artifacts: Path, **overrides) -> dict:
    """The flow, called in this process on tiny images; returns the run's summary."""
    from flows.train_flow import train_flow

    params = {
        "data": str(data),
        "models": ["model1"],
        "epochs": 1,
        "artifacts": str(artifacts),
        **SMALL,
        **overrides,
    }
    train_flow(**params)
    return json.loads((artifacts / "summary.json").read_text())


def computed(summary: dict) -> set[str]:
    """The tasks a run computed (the others were cache hits)."""
    return {task for task, state in summary["tasks"].items() if state == "Completed"}


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
        "--no-export",
        "--artifacts",
        str(artifacts),
    ]


def copy_of_the_project(folder: Path) -> Path:
    """A copy of the project's packages, imported instead of the installed ones when it is
    first on PYTHONPATH."""
    for package in ("catdog", "tasks", "flows"):
        shutil.copytree(
            REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return folder


# The two ways to start a run: the recipe's script, and the installed `catdog` command.
FLOW_SCRIPT = (sys.executable, str(REPO / "flows" / "train_flow.py"))
CATDOG_RUN = (str(Path(sys.executable).with_name("catdog")), "run")


def real_flow_command(
    artifacts: Path, *options: str, entry: tuple[str, ...] = FLOW_SCRIPT
) -> list[str]:
    """A run (`entry`) on ../shared's real photos and MobileNetV2 weights."""
    return [
        *entry,
        "--data",
        str(REAL_ZIP),
        "--weights",
        str(REAL_WEIGHTS),
        *options,
        "--artifacts",
        str(artifacts),
    ]


def api_env() -> dict[str, str]:
    """The environment that points a flow subprocess at this test session's Prefect API, so
    that it does not start (and migrate the database of) a server of its own."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": str(PREFECT_API_URL.value())}


def flow_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a flow subprocess: this one's, its own Prefect home, this test
    session's API (`api_env`), and `extra`."""
    return {**os.environ, "PREFECT_HOME": str(home), **api_env(), **extra}


def task_run_logs(flow_run_id: str, task_run_name: str) -> str:
    """Every log line the Prefect API holds for a task run of a flow run."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterTaskRunId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    with get_client(sync_client=True) as client:
        (task_run,) = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[task_run_name])),
        )
        logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run.id])))
    return "\n".join(log.message for log in logs)


# ----------------------------------------------------------------------------- a Dask cluster

# Thread counts change how TensorFlow rounds its sums; with the same count, the same numbers.
ONE_TF_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class DaskCluster:
    address: str
    workers: list[subprocess.Popen]

    @property
    def worker_pids(self) -> set[int]:
        return {worker.pid for worker in self.workers if worker.poll() is None}


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[DaskCluster]:
    """`dask scheduler` and two `dask worker` processes without nannies (a killed worker stays
    dead), one task and one TensorFlow thread each, as the README's "Scaling out" starts them."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, **ONE_TF_THREAD, "PREFECT_LOGGING_EXTRA_LOGGERS": "catdog,tasks"}
    dask = [sys.executable, "-m", "dask"]
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    files = contextlib.ExitStack()
    # A task goes to a worker that holds its inputs: every training depends on the same
    # decoded arrays, so all of them may queue on one worker while the other idles, until the
    # scheduler's work stealing moves one. It moves a queued task when its expected run time
    # dwarfs the transfer of its inputs; a task kind that has not finished yet is expected to
    # take `unknown-task-duration` (0.5 s by default, too short to be worth moving at once).
    scheduler_env = {**env, "DASK_DISTRIBUTED__SCHEDULER__UNKNOWN_TASK_DURATION": "60s"}
    processes = [
        subprocess.Popen(
            [*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            env=scheduler_env,
            stdout=subprocess.DEVNULL,
            stderr=files.enter_context((logs / "scheduler.log").open("w")),
        )
    ]
    try:
        for i in range(2):
            processes.append(
                subprocess.Popen(
                    [
                        *dask,
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--no-nanny",
                        "--no-dashboard",
                        "--name",
                        f"worker-{i}",
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=files.enter_context((logs / f"worker-{i}.log").open("w")),
                    cwd=tmp_path,
                )
            )
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield DaskCluster(address, processes[1:])
    finally:
        for process in reversed(processes):
            process.kill()
            process.wait()
        files.close()
