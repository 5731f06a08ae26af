"""The command line's own temporary Prefect server: used, stopped, never left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.local_api import EarlyApiServer
from tests.conftest import flow_command

SERVER_APP = "prefect.server.api.server:create_app"
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def _servers_started_by(pid: int) -> list[int]:
    """Live (not zombie) children of `pid` running Prefect's server application."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z" and SERVER_APP in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _server_of(run: subprocess.Popen, timeout: float = 60) -> int | None:
    """The Prefect server `run` starts, once it appears, while `run` is still going."""
    deadline = time.monotonic() + timeout
    while run.poll() is None and time.monotonic() < deadline:
        servers = _servers_started_by(run.pid)
        if servers:
            assert len(servers) == 1, servers
            return servers[0]
        time.sleep(0.05)
    return None


def _cli_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    return env


@linux_only
@pytest.mark.slow  # a whole flow run
def test_a_run_uses_its_early_server_and_stops_it(dataset_zip, tmp_path):
    run = subprocess.Popen(
        flow_command(dataset_zip, tmp_path / "artifacts", epochs=1),
        env=_cli_env(tmp_path / "home"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = _server_of(run)
    output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output
    assert server is not None, "the run started no server of its own"
    assert not _alive(server)
    # Prefect's own temporary server was not needed, and nothing was sent after ours stopped.
    assert "Starting temporary server" not in output
    assert "Error logging to API" not in output
    assert (tmp_path / "artifacts/summary.json").is_file()


@linux_only
@pytest.mark.slow  # starts a Prefect API server
def test_a_killed_run_takes_its_server_with_it(dataset_zip, tmp_path):
    run = subprocess.Popen(
        flow_command(dataset_zip, tmp_path / "artifacts", epochs=50),
        env=_cli_env(tmp_path / "home"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = _server_of(run)
    assert server is not None, "the run started no server of its own"
    run.send_signal(signal.SIGKILL)  # no atexit, no finally: only the kernel can stop it now
    run.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server)


def test_no_early_server_when_the_environment_names_an_api(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert EarlyApiServer.spawn() is None
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_ENABLED", "false")
    assert EarlyApiServer.spawn() is None


@pytest.mark.slow  # starts a Prefect API server
def test_an_api_url_from_a_profile_wins_and_the_early_server_stops(monkeypatch, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    server = EarlyApiServer.spawn()
    assert server is not None
    configured = "http://127.0.0.1:9/api"
    with temporary_settings(updates={PREFECT_API_URL: configured}), server.in_use() as used:
        assert used is False
        assert PREFECT_API_URL.value() == configured
    assert server.process.poll() is not None


@pytest.mark.slow  # starts a Prefect API server
def test_a_server_that_cannot_start_falls_back_to_prefects_own(monkeypatch, tmp_path):
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    server = EarlyApiServer.spawn()
    assert server is not None
    server.process.kill()
    updates = {PREFECT_API_URL: None, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 5}
    with temporary_settings(updates=updates), server.in_use() as used:
        assert used is False
        assert not PREFECT_API_URL.value()


def test_the_prefect_internals_it_copies_are_still_there():
    """flows/local_api.py starts the server the way Prefect's own temporary server starts
    (private flags, the app factory) and drains Prefect's queues before stopping it. A Prefect
    release that changes any of these fails here, not silently in a user's run."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api import server

    launch = inspect.getsource(server.SubprocessASGIServer._run_uvicorn_command)
    for name in ("PREFECT__SERVER_EPHEMERAL", "PREFECT__SERVER_FINAL", "--factory", SERVER_APP):
        assert name in launch, f"Prefect no longer starts its temporary server with {name}"
    factory = inspect.getsource(server.create_app)
    assert 'os.getenv("PREFECT__SERVER_EPHEMERAL")' in factory
    assert 'os.getenv("PREFECT__SERVER_FINAL")' in factory
    assert callable(APILogWorker.drain_all) and callable(EventsWorker.drain_all)
