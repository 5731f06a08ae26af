"""Against a real `prefect server start` (opt-in: CATDOG_SERVER_TESTS=1; about two minutes).

The run's artifacts as the UI shows them, a rerun's cache hits, and `prefect deploy` of
prefect.yaml. The rest of the suite uses Prefect's in-process test harness instead.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_server.py"

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(
        os.environ.get("CATDOG_SERVER_TESTS") != "1",
        reason="starts a real Prefect server; set CATDOG_SERVER_TESTS=1",
    ),
]


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
    assert deployment.parameters == {"epochs": 2}  # the rest are the flow's defaults
    [pull] = deployment.pull_steps
    directory = pull["prefect.deployments.steps.set_working_directory"]["directory"]
    assert Path(directory).resolve() == ROOT


def test_a_served_schedule_follows_the_archive_at_a_url(
    server: dict[str, str], site: Any, tmp_path: Path
) -> None:
    """The freshness sequence of tests/test_freshness.py, run by `serve` on a short interval."""
    import json
    import time

    from tests.conftest import ALWAYS_RUN, publish

    folder = site.folder
    publish(folder, tmp_path, "pets.zip", 6, 1)
    artifacts = tmp_path / "artifacts"
    command = [sys.executable, str(ROOT / "flows/train_flow.py"), "serve", "--interval", "40"]
    command += ["--data", site.url("pets.zip"), "--models", "model1", "--epochs", "1"]
    command += ["--image-size", "32", "--batch-size", "8", "--artifacts", str(artifacts)]
    serving = subprocess.Popen(
        command, env=server, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def summaries(count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            found = sorted((artifacts / "05_reports/runs").glob("*/summary.json"))
            if len(found) >= count:
                return [json.loads(path.read_text()) for path in found]
            assert serving.poll() is None, serving.stdout.read() if serving.stdout else ""
            time.sleep(2)
        raise AssertionError(f"fewer than {count} scheduled runs finished in time")

    def computed(summary: dict[str, Any]) -> set[str]:
        return {task for task, state in summary["tasks"].items() if state == "Completed"}

    try:
        first = summaries(1)[0]
        assert first["data"]["counts"]["train"] == {"cats": 6, "dogs": 6}
        publish(folder, tmp_path, "pets.zip", 9, 2)
        site.requests.clear()
        second = summaries(2)[1]
        assert second["data"]["counts"]["train"] == {"cats": 9, "dogs": 9}
        assert set(second["tasks"].values()) == {"Completed"}
        assert site.requests.count("GET") == 1
        site.requests.clear()
        third = summaries(3)[2]
        assert site.requests == ["HEAD"] and computed(third) == ALWAYS_RUN
        site.mode = "busy"
        fourth = summaries(4)[3]
        assert fourth["data"]["source_fresh"] is False and computed(fourth) == ALWAYS_RUN
        assert "HTTP 503" in fourth["data"]["source_warning"]
    finally:
        serving.terminate()
        serving.communicate(timeout=60)
