"""Against a real `prefect server start`, each test on its own free port and Prefect home, the
server stopped whole (its process group) however the test ends.

The run's artifacts as the UI shows them, a rerun's cache hits, and `prefect deploy` of
prefect.yaml. The rest of the suite uses Prefect's in-process test harness instead.
"""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_server.py"

pytestmark = [pytest.mark.server, pytest.mark.slow]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_server", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_check_server_script_passes(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--rerun", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
    assert "every stage task Cached" in result.stdout


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A real server on a free port; yields the environment that points at it."""
    script = load_script()
    api_url = f"http://127.0.0.1:{script.free_port()}/api"
    env = script.server_env(api_url, tmp_path / "prefect-home")
    process = script.start_server(int(api_url.split(":")[2].split("/")[0]), env, tmp_path / "log")
    try:
        script.wait_healthy(api_url, process, timeout=180)
        yield env
    finally:
        script.stop_server(process)


def test_prefect_yaml_deploys_to_a_process_work_pool(server: dict[str, str]) -> None:
    prefect = [sys.executable, "-m", "prefect"]

    def cli(*args: str) -> str:
        env = {**server, "PWD": str(ROOT)}  # as a shell in the checkout sets it
        done = subprocess.run(
            [*prefect, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    cli("work-pool", "create", "catdog-process", "--type", "process")
    cli("--no-prompt", "deploy", "-n", "scheduled-retraining", "--param", "epochs=2")

    async def read() -> Any:
        from prefect.client.orchestration import PrefectClient

        async with PrefectClient(server["PREFECT_API_URL"]) as client:
            return await client.read_deployment_by_name("catdog-train/scheduled-retraining")

    deployment = asyncio.run(read())
    assert deployment.work_pool_name == "catdog-process"
    assert deployment.entrypoint == "flows/train_flow.py:train_flow"
    [schedule] = deployment.schedules
    assert schedule.schedule.cron == "0 3 * * 1" and schedule.active
    # prefect.yaml's own (hold production on failed data checks), the one given, the rest the
    # flow's defaults.
    assert deployment.parameters == {"on_data_issue": "hold", "epochs": 2}
    [pull] = deployment.pull_steps
    directory = pull["prefect.deployments.steps.set_working_directory"]["directory"]
    assert Path(directory).resolve() == ROOT


def test_a_served_schedule_follows_the_archive_at_a_url(
    server: dict[str, str], site: Any, tmp_path: Path
) -> None:
    """The freshness sequence of tests/test_freshness.py, run by `serve` on a short interval.

    On a busy machine a run may take longer than the interval, so the run after the one that
    just finished can already be under way when the source changes: each step reads the run
    that saw the change (the first with the new images; the first that started after it)."""
    import json
    import time
    from datetime import datetime

    import httpx

    from tests.conftest import ALWAYS_RUN, publish

    folder = site.folder
    publish(folder, tmp_path, "pets.zip", 6, 1)
    artifacts = tmp_path / "artifacts"
    command = [sys.executable, str(ROOT / "flows/train_flow.py"), "serve", "--interval", "40"]
    command += ["--data", site.url("pets.zip"), "--models", "model1", "--epochs", "1"]
    command += ["--image-size", "32", "--batch-size", "8", "--artifacts", str(artifacts)]
    log = tmp_path / "serve.log"  # a file, not a pipe nobody reads: a full pipe would stall it
    with log.open("w") as output:
        serving = subprocess.Popen(
            command,
            env=server,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stopped with the runs it started, as a process group
        )
    script = load_script()

    def started(summary: dict[str, Any]) -> float:
        url = f"{server['PREFECT_API_URL']}/flow_runs/{summary['run']['id']}"
        return datetime.fromisoformat(httpx.get(url).json()["start_time"]).timestamp()

    def first_run(such: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first finished scheduled run (in the order they finished) that is `such`."""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            for path in sorted((artifacts / "05_reports/runs").glob("*/summary.json")):
                summary = json.loads(path.read_text())
                if such(summary):
                    return summary
            assert serving.poll() is None, log.read_text()[-3000:]
            time.sleep(2)
        raise AssertionError("the scheduled run the test waits for did not finish in time")

    def started_after(moment: float) -> Callable[[dict[str, Any]], bool]:
        return lambda summary: started(summary) > moment

    def trained_on(images: int) -> Callable[[dict[str, Any]], bool]:
        return lambda summary: summary["data"]["counts"]["train"]["cats"] == images

    def computed(summary: dict[str, Any]) -> set[str]:
        return {task for task, state in summary["tasks"].items() if state == "Completed"}

    try:
        first = first_run(started_after(0.0))
        assert first["data"]["counts"]["train"] == {"cats": 6, "dogs": 6}
        site.requests.clear()
        publish(folder, tmp_path, "pets.zip", 9, 2)
        second = first_run(trained_on(9))
        assert second["data"]["counts"]["train"] == {"cats": 9, "dogs": 9}
        assert set(second["tasks"].values()) == {"Completed"}
        assert site.requests.count("GET") == 1  # every later run only asks (HEAD)
        site.requests.clear()
        asked = time.time()
        third = first_run(started_after(asked))
        assert set(site.requests) == {"HEAD"} and computed(third) == ALWAYS_RUN
        site.mode = "busy"
        busy = time.time()
        fourth = first_run(started_after(busy))
        assert fourth["data"]["source_fresh"] is False and computed(fourth) == ALWAYS_RUN
        assert "HTTP 503" in fourth["data"]["source_warning"]
    finally:
        script.stop_server(serving)


def test_serve_and_a_process_worker_run_against_an_api_that_wants_a_password(
    tmp_path: Path, dataset_zip: Path
) -> None:
    """A server under PREFECT_SERVER_API_AUTH_STRING: a client without the password is refused
    and creates nothing; with it, `serve` and a process worker each run a deployment run."""
    import time

    import httpx

    script = load_script()
    port = script.free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    password = "catdog:not-a-real-secret"
    env = script.server_env(api_url, tmp_path / "prefect-home")
    process = script.start_server(
        port, {**env, "PREFECT_SERVER_API_AUTH_STRING": password}, tmp_path / "log"
    )
    client_env = {**env, "PREFECT_API_AUTH_STRING": password, "PWD": str(ROOT)}
    auth = tuple(password.split(":", 1))
    started: list[subprocess.Popen] = []

    def prefect(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "prefect", *args],
            cwd=ROOT,
            env=client_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def finished(deployment: str, count: int) -> list[dict]:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            runs = httpx.post(
                f"{api_url}/flow_runs/filter",
                json={"deployments": {"name": {"any_": [deployment]}}},
                auth=auth,
            ).json()
            done = [run for run in runs if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]
            if len(done) >= count:
                return done
            time.sleep(2)
        raise AssertionError(f"no run of {deployment} finished in time")

    options = ["--data", str(dataset_zip), "--models", "model1", "--epochs", "1"]
    options += ["--image-size", "32", "--batch-size", "8", "--no-export"]
    try:
        script.wait_healthy(api_url, process, timeout=180)
        assert httpx.post(f"{api_url}/flows/filter", json={}).status_code == 401
        assert httpx.post(f"{api_url}/flows/", json={"name": "x"}).status_code == 401
        assert httpx.post(f"{api_url}/flows/filter", json={}, auth=auth).json() == []
        # The alerts setup, through the same password.
        flow_cli = [sys.executable, str(ROOT / "flows/train_flow.py"), "alerts"]
        for extra in (["--webhook", "http://127.0.0.1:9/hook"], ["--remove"]):
            done = subprocess.run(
                [*flow_cli, *extra], env=client_env, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, done.stderr
        assert "removed 3 automation(s)" in done.stdout

        serving = subprocess.Popen(
            [
                *(sys.executable, str(ROOT / "flows/train_flow.py"), "serve"),
                *("--interval", "86400", *options),
                *("--artifacts", str(tmp_path / "served"), "--name", "served"),
            ],
            env=client_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        started.append(serving)
        deadline = time.monotonic() + 120
        while "catdog-train/served" not in prefect("deployment", "ls"):
            assert time.monotonic() < deadline and serving.poll() is None
            time.sleep(2)
        prefect("deployment", "run", "catdog-train/served")
        assert {run["state_type"] for run in finished("served", 1)} == {"COMPLETED"}

        prefect("work-pool", "create", "catdog-process", "--type", "process")
        parameters = [
            f"--param={name}={value}"
            for name, value in (
                ("data", str(dataset_zip)),
                ("models", '["model1"]'),
                ("epochs", "1"),
                ("image_size", "32"),
                ("batch_size", "8"),
                ("export", "false"),
                ("artifacts", str(tmp_path / "by-worker")),
            )
        ]
        prefect("--no-prompt", "deploy", "-n", "scheduled-retraining", *parameters)
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "catdog-process"],
            cwd=ROOT,
            env=client_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        started.append(worker)
        prefect("deployment", "run", "catdog-train/scheduled-retraining")
        runs = finished("scheduled-retraining", 1)
        assert {run["state_type"] for run in runs} == {"COMPLETED"}
        assert (tmp_path / "by-worker" / "summary.json").is_file()
    finally:
        # Each in its own process group, with the runs it started; SIGKILL after 20 s, as a
        # worker's shutdown can hang on a busy machine. The server is stopped whatever they do.
        try:
            for child in started:
                script.stop_server(child)
        finally:
            script.stop_server(process)


def test_alerts_notify_a_failure_and_a_promotion_once_and_come_down(
    server: dict[str, str], tmp_path: Path, dataset_zip: Path
) -> None:
    """The alerts setup against a real server, with a webhook receiver on 127.0.0.1: a run on
    a hostile archive sends one failure notification naming it; a first run, one "production
    changed"; an unchanged rerun, none; --remove leaves no catdog automation."""
    import json
    import threading
    import time
    import zipfile
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[dict[str, str]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    flow = [sys.executable, str(ROOT / "flows/train_flow.py")]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*flow, *args], env=server, capture_output=True, text=True, timeout=600, cwd=tmp_path
        )

    def notifications(count: int, within: float = 60) -> list[dict[str, str]]:
        deadline = time.monotonic() + within
        while len(received) < count and time.monotonic() < deadline:
            time.sleep(0.5)
        return list(received)

    try:
        webhook = f"http://127.0.0.1:{hook.server_address[1]}/alerts"
        setup = run("alerts", "--webhook", webhook)
        assert setup.returncode == 0, setup.stderr
        assert run("alerts", "--webhook", webhook).returncode == 0  # again: replaced, not doubled

        hostile = tmp_path / "hostile.zip"
        with zipfile.ZipFile(hostile, "w") as archive, zipfile.ZipFile(dataset_zip) as good:
            for member in good.namelist():
                archive.writestr(member, good.read(member))
            archive.writestr("../../escape.jpg", b"x")
        small = ["--models", "model1", "--epochs", "1", "--image-size", "32", "--no-export"]
        failed = run("--data", str(hostile), *small, "--artifacts", str(tmp_path / "a"))
        assert failed.returncode == 2, failed.stderr
        [failure] = notifications(1)
        assert "Failed" in failure["subject"] and "escape.jpg" in failure["body"]
        assert "on hostile.zip" in failure["subject"]  # the run's name

        first = run("--data", str(dataset_zip), *small, "--artifacts", str(tmp_path / "b"))
        assert first.returncode == 0, first.stderr
        changed = notifications(2)[1]
        assert changed["subject"] == "catdog: model1 is production"
        assert "rule first" in changed["body"]
        rerun = run("--data", str(dataset_zip), *small, "--artifacts", str(tmp_path / "b"))
        assert rerun.returncode == 0, rerun.stderr
        time.sleep(15)  # what an automation would have sent by now
        assert len(received) == 2, received

        removed = run("alerts", "--remove")
        assert removed.returncode == 0 and "removed 3 automation(s)" in removed.stdout

        async def names() -> list[str]:
            from prefect.client.orchestration import PrefectClient

            async with PrefectClient(server["PREFECT_API_URL"]) as client:
                return [automation.name for automation in await client.read_automations()]

        assert not [name for name in asyncio.run(names()) if name.startswith("catdog")]
    finally:
        hook.shutdown()
        hook.server_close()
