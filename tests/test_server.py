"""Against a real `prefect server start`, each test on its own free port and Prefect home, the
server stopped whole (its process group) however the test ends.

The run's artifacts as the UI shows them, a rerun's cache hits, and `prefect deploy` of
prefect.yaml. The rest of the suite uses Prefect's in-process test harness instead.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


@dataclass
class Webhook:
    url: str
    received: list[dict[str, str]]  # each notification's JSON {subject, body}, in order


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    """A receiver on 127.0.0.1 of what Prefect's webhook notification block POSTs."""
    import threading
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
    try:
        yield Webhook(f"http://127.0.0.1:{hook.server_address[1]}/alerts", received)
    finally:
        hook.shutdown()
        hook.server_close()


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
    # One run at a time, the next waiting; and `catdog watch`'s event starts a run.
    assert deployment.global_concurrency_limit and deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
    [trigger] = [
        automation["trigger"]
        for automation in Api(server).post("/automations/filter", {})
        if automation["actions"][0].get("deployment_id") == str(deployment.id)
    ]
    assert trigger["expect"] == ["catdog.data.changed"] and trigger["posture"] == "Reactive"


def test_a_served_schedule_follows_the_archive_at_a_url(
    server: dict[str, str], site: Any, tmp_path: Path
) -> None:
    """The freshness sequence of tests/test_freshness.py, run by `serve` on a short interval.

    On a busy machine a run may take longer than the 20 s interval (the next one then waits
    for it: one run at a time), so the run after the one that just finished can already be
    under way when the source changes: each step reads the run that saw the change (the first
    with the new images; the first that started after it)."""
    import json
    import time
    from datetime import datetime

    import httpx

    from tests.conftest import ALWAYS_RUN, publish

    folder = site.folder
    publish(folder, tmp_path, "pets.zip", 6, 1)
    artifacts = tmp_path / "artifacts"
    command = [sys.executable, str(ROOT / "flows/train_flow.py"), "serve", "--interval", "20"]
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
        assert "removed 4 automation(s)" in done.stdout

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
    server: dict[str, str], tmp_path: Path, dataset_zip: Path, webhook: Webhook
) -> None:
    """The alerts setup against a real server, with a webhook receiver on 127.0.0.1: a run on
    a hostile archive sends one failure notification naming it; a first run, one "production
    changed"; an unchanged rerun, none; --remove leaves no catdog automation."""
    import time
    import zipfile

    received = webhook.received
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

    setup = run("alerts", "--webhook", webhook.url)
    assert setup.returncode == 0, setup.stderr
    assert run("alerts", "--webhook", webhook.url).returncode == 0  # replaced, not doubled

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
    assert removed.returncode == 0 and "removed 4 automation(s)" in removed.stdout

    async def names() -> list[str]:
        from prefect.client.orchestration import PrefectClient

        async with PrefectClient(server["PREFECT_API_URL"]) as client:
            return [automation.name for automation in await client.read_automations()]

    assert not [name for name in asyncio.run(names()) if name.startswith("catdog")]


class Api:
    """The few reads of a real server's API that the served tests make."""

    def __init__(self, env: dict[str, str]) -> None:
        self.url = env["PREFECT_API_URL"]

    def post(self, path: str, body: dict[str, Any]) -> Any:
        import httpx

        response = httpx.post(f"{self.url}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def runs(self, deployment: str) -> list[dict[str, Any]]:
        return self.post("/flow_runs/filter", {"deployments": {"name": {"any_": [deployment]}}})

    def events(self, name: str, about: str | None = None) -> list[dict[str, Any]]:
        """Events called `name` (of the last hour), oldest first; `about`: a related resource."""
        from datetime import UTC, datetime, timedelta

        since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        event_filter: dict[str, Any] = {"event": {"name": [name]}, "occurred": {"since": since}}
        if about:
            event_filter["any_resource"] = {"id": [about]}
        page = self.post("/events/filter", {"filter": event_filter, "limit": 50})
        return sorted(page["events"], key=lambda event: event["occurred"])

    def wait(self, what: str, read: Callable[[], Any], timeout: float) -> Any:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := read():
                return found
            time.sleep(1)
        raise AssertionError(f"{what}: not within {timeout:.0f} s")


def catdog_process(command: str, env: dict[str, str], log: Path, *options: str) -> subprocess.Popen:
    """`catdog COMMAND` in a process group of its own (stopped whole with the runs it started),
    logging to a file rather than a pipe nobody reads."""
    with log.open("w") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "catdog", command, *options],
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


TINY_RUN = ["--models", "model1", "--image-size", "32", "--batch-size", "8", "--no-export"]


def test_a_watched_folder_starts_one_served_run_per_settled_change_one_at_a_time(
    server: dict[str, str], tmp_path: Path
) -> None:
    """`catdog watch` on a folder and `catdog serve --on-data-change` against a real server:
    no change in ten looks starts nothing; ten quick changes start one run, on all ten images;
    ten more while that run starts and trains start one more, which waits for it to end; each
    run is linked to the event that started it."""
    import time
    from datetime import datetime

    from tests.conftest import make_dataset, write_image

    api = Api(server)
    folder = make_dataset(tmp_path / "pets", train=6, validation=6)
    artifacts = tmp_path / "artifacts"
    every, settle = 1, 3
    where = ["--data", str(folder), "--artifacts", str(artifacts)]
    serving = catdog_process(
        "serve",
        server,
        tmp_path / "serve.log",
        "--on-data-change",
        *where,
        *TINY_RUN,
        "--epochs",
        "3",
        "--name",
        "on-change",
    )
    watch_log = tmp_path / "watch.log"
    watching = catdog_process(
        "watch", server, watch_log, *where, "--every", str(every), "--settle", str(settle)
    )
    script = load_script()

    def announced() -> list[str]:
        lines = watch_log.read_text().splitlines()
        return [line.split()[1].rstrip(":") for line in lines if line.startswith(EVENT_NAME)]

    def burst(name: str) -> float:
        for index in range(10):
            write_image(folder / "train" / "cats" / f"{name}.{index}.jpg", len(name) * 100 + index)
            time.sleep(0.3)
        return time.time()

    try:
        api.wait("the deployment and its trigger", lambda: _automation(api, "on-change"), 180)
        api.wait("the watch's first look", lambda: "watching" in watch_log.read_text(), 120)
        time.sleep(10 * every)
        assert api.runs("on-change") == [] and announced() == []

        settled = burst("first")
        [first] = api.wait("a run after the first burst", lambda: api.runs("on-change"), 120)
        # The watch announced within --settle and one --every of the last change (and its look's
        # own time, with some room for a busy machine); the server made the run from it at once.
        # The trigger acts on the event stream: the stored event can come a moment later.
        [event] = api.wait("the stored event", lambda: api.events(EVENT_NAME), 60)
        occurred = datetime.fromisoformat(event["occurred"]).timestamp()
        assert occurred - settled < settle + every + 5, occurred - settled
        assert datetime.fromisoformat(first["created"]).timestamp() - occurred < 15
        burst("second")  # while the first run starts and trains
        runs = api.wait("a second run", lambda: _at_least(api.runs("on-change"), 2), 120)
        second = next(run for run in runs if run["id"] != first["id"])
        for run in (first, second):
            api.wait("runs to finish", lambda run=run: _state(api, run) == "COMPLETED", 600)
        first, second = _run(api, first), _run(api, second)
        assert second["created"] < first["end_time"] <= second["start_time"]  # it waited
        time.sleep(5 * every)
        assert len(api.runs("on-change")) == 2 and len(announced()) == 2

        reports = artifacts.glob("05_reports/runs/*/summary.json")
        summaries = sorted(
            (json.loads(path.read_text()) for path in reports),
            key=lambda summary: summary["run"]["finished_at"],
        )
        # A run reads the folder when it starts: the first saw all of the first burst (and maybe
        # some of the second), the second saw everything.
        cats = [summary["data"]["counts"]["train"]["cats"] for summary in summaries]
        assert cats[0] >= 16 and cats[1] == 26, cats
        for run, event_id in zip((first, second), announced(), strict=True):
            # The run's page names the automation that made it ("Created by")...
            assert run["created_by"]["type"] == "AUTOMATION"
            assert (
                run["created_by"]["display_value"] == "catdog: run on-change when its data changes"
            )
            # ...and the event feed links the run to the event that started it.
            about_run = f"prefect.flow-run.{run['id']}"
            [creation] = api.events("prefect.automation.action.executed", about_run)
            triggers = [
                related["prefect.resource.id"]
                for related in creation["related"]
                if related["prefect.resource.role"] == "triggering-event"
            ]
            assert triggers == [f"prefect.event.{event_id}"]
    finally:
        script.stop_server(watching)
        script.stop_server(serving)


def test_a_run_whose_process_is_killed_is_marked_crashed_and_notified(
    server: dict[str, str], tmp_path: Path, dataset_zip: Path, webhook: Webhook
) -> None:
    """`catdog alerts --silent-after 60` and a served run with 30 s heartbeats: SIGKILL to the
    serving process and its run (a machine that died) leaves the run Running until the
    automation marks it Crashed, within the bound; the alert reaches a webhook on 127.0.0.1."""
    import time
    from datetime import datetime

    received = webhook.received
    api = Api(server)
    script = load_script()
    alerts = ["alerts", "--webhook", webhook.url, "--silent-after", "60"]
    setup = subprocess.run(
        [sys.executable, "-m", "catdog", *alerts],
        env=server,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert setup.returncode == 0, setup.stderr
    serving = catdog_process(
        "serve",
        {**server, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"},
        tmp_path / "serve.log",
        "--cron",
        "0 0 1 1 *",
        "--data",
        str(dataset_zip),
        *TINY_RUN,
        "--epochs",
        "20",
        "--artifacts",
        str(tmp_path / "artifacts"),
        "--name",
        "killed",
    )
    try:
        deployment = api.wait("the deployment", lambda: _deployment(api, "killed"), 180)
        run = api.post(f"/deployments/{deployment['id']}/create_flow_run", {})
        beat = api.wait(
            "the run's first heartbeat",
            lambda: api.events("prefect.flow-run.heartbeat", f"prefect.flow-run.{run['id']}"),
            300,
        )[-1]
        os.killpg(serving.pid, signal.SIGKILL)
        serving.wait()
        time.sleep(5)  # a heartbeat sent just before the kill reaches the event feed
        beat = api.events("prefect.flow-run.heartbeat", f"prefect.flow-run.{run['id']}")[-1]
        assert _state(api, run) == "RUNNING"
        api.wait("the Crashed state", lambda: _state(api, run) == "CRASHED", 180)
        crashed = datetime.fromisoformat(_run(api, run)["state"]["timestamp"])
        silent = (crashed - datetime.fromisoformat(beat["occurred"])).total_seconds()
        assert 60 <= silent < 60 + 45, silent  # the bound, and the automation's evaluation
        assert "no heartbeat for 60 s" in _run(api, run)["state"]["message"]
        [alert] = api.wait("the alert", lambda: list(received), 60)
        assert "Crashed" in alert["subject"] and "no heartbeat for 60 s" in alert["body"]
    finally:
        script.stop_server(serving)


EVENT_NAME = "catdog.data.changed"


def _run(api: Api, run: dict[str, Any]) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{api.url}/flow_runs/{run['id']}", timeout=30).json()


def _state(api: Api, run: dict[str, Any]) -> str:
    return str(_run(api, run)["state_type"])


def _at_least(runs: list[dict[str, Any]], count: int) -> list[dict[str, Any]] | None:
    return runs if len(runs) >= count else None


def _deployment(api: Api, name: str) -> dict[str, Any] | None:
    found = api.post("/deployments/filter", {"deployments": {"name": {"any_": [name]}}})
    return found[0] if found else None


def _automation(api: Api, deployment: str) -> bool:
    names = [automation["name"] for automation in api.post("/automations/filter", {})]
    return f"catdog: run {deployment} when its data changes" in names
