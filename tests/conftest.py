"""Shared fixtures: a Prefect test API, and small generated image datasets as real files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# As flows/train_flow.py: library lines logged outside a flow run stay in the terminal.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

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


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 30), bright: bool = False):
    """A small real JPEG whose content depends on `seed` (so hashes differ)."""
    rng = np.random.default_rng(seed)
    base = 170 if bright else 40
    pixels = rng.integers(0, 80, (size[1], size[0], 3), dtype=np.uint8) + base
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, format="JPEG", quality=90)
    return path


def make_dataset(
    root: Path,
    *,
    train: int = 12,
    validation: int = 10,
    classes: tuple[str, ...] = ("cats", "dogs"),
    seed: int = 0,
) -> Path:
    """`root/{train,validation}/<class>/*.jpg`, classes told apart by brightness."""
    counter = seed * 100_000
    for split, count in (("train", train), ("validation", validation)):
        for index, name in enumerate(classes):
            for i in range(count):
                counter += 1
                write_image(
                    root / split / name / f"{name}.{split}.{i}.jpg", counter, bright=index % 2 == 1
                )
    return root


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.rglob("*")):
            handle.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


@pytest.fixture
def dataset_zip(tmp_path: Path) -> Path:
    """The official layout in miniature, nested one level down as in the real archive."""
    folder = make_dataset(tmp_path / "src")
    return zip_folder(folder, tmp_path / "tiny.zip", prefix="tiny_filtered/")


class Site(ThreadingHTTPServer):
    """Serves a folder as `python -m http.server` does (Last-Modified, Content-Length, HEAD),
    counting requests; `mode` makes it answer 503 or an HTML page instead."""

    def __init__(self, folder: Path) -> None:
        super().__init__(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
        self.folder = folder
        self.requests: list[str] = []
        self.mode = "normal"

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class Handler(SimpleHTTPRequestHandler):
    server: Site

    def _scripted(self) -> bool:
        self.server.requests.append(self.command)
        if self.server.mode == "normal":
            return False
        status, body, kind = (
            (503, b"busy", "text/plain")
            if self.server.mode == "busy"
            else (200, b"<html>Sign in to continue</html>", "text/html")
        )
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)
        return True

    def do_GET(self) -> None:
        if not self._scripted():
            super().do_GET()

    def do_HEAD(self) -> None:
        if not self._scripted():
            super().do_HEAD()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    folder = tmp_path / "site"
    folder.mkdir()
    server = Site(folder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def publish(site_folder: Path, tmp_path: Path, name: str, train: int, seed: int) -> Path:
    source = make_dataset(tmp_path / f"src-{name}-{train}", train=train, validation=6, seed=seed)
    staged = zip_folder(source, tmp_path / f"{name}-{train}.zip")
    shutil.copy(staged, site_folder / name)
    return site_folder / name


# ----------------------------------------------------------------------------- flow runs

# Exports on promotion have tests of their own (test_export.py); the other runs skip them, a
# few seconds each.
SMALL = {"image_size": 32, "batch_size": 8, "seed": 7, "export": False}
# The stages every run runs, cached or not: the data checks, the promotion gate and the report.
ALWAYS_RUN = {"check_data", "promote_model", "write_report"}


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


def api_env() -> dict[str, str]:
    """The environment that points a flow subprocess at this test session's Prefect API, so
    that it does not start (and migrate the database of) a server of its own."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": str(PREFECT_API_URL.value())}


def flow_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a flow subprocess: this one's, its own Prefect home, this test
    session's API (`api_env`), and `extra`."""
    return {**os.environ, "PREFECT_HOME": str(home), **api_env(), **extra}


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
