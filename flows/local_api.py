"""A temporary Prefect API server for one command-line run, started before Prefect is imported.

With no API configured, Prefect starts a temporary server itself, but only once the flow begins:
it first imports the whole server application into this process (~2.7 s on two cores), then
waits for the server subprocess to answer (~3.5 s), all after this process's own imports. A fully
cached run is nearly all that fixed cost. Starting the same server process first lets its start-up
overlap ours and keeps the server code out of this process.

This module imports nothing from Prefect at import time, so that the spawn can come first.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

_FALSE = ("0", "false", "no", "off")


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_with_parent() -> None:
    """In the child, before exec: Linux sends it SIGTERM if this process dies, even by SIGKILL,
    so that a killed run leaves no server behind holding Prefect's database."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class EarlyApiServer:
    """Prefect's own temporary server (same command, same settings), spawned ahead of time."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.api_url = f"http://127.0.0.1:{port}/api"
        atexit.register(self.stop)

    @classmethod
    def spawn(cls) -> EarlyApiServer | None:
        """Start the server unless the environment already names an API or forbids a local one."""
        if os.environ.get("PREFECT_API_URL"):
            return None
        if os.environ.get("PREFECT_SERVER_EPHEMERAL_ENABLED", "true").lower() in _FALSE:
            return None
        spec = importlib.util.find_spec("prefect")
        if spec is None or not spec.submodule_search_locations:
            return None
        port = _free_port()
        # The command and variables Prefect's SubprocessASGIServer uses for its temporary server.
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(Path(next(iter(spec.submodule_search_locations))).parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env={
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
            },
            preexec_fn=_stop_with_parent if sys.platform == "linux" else None,
        )
        return cls(process, port)

    def wait_until_ready(self, timeout: float) -> bool:
        """True once the server answers its health check; False if it exited or timed out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Shut the server down gracefully, so that it finishes writing this run's records."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @contextlib.contextmanager
    def in_use(self) -> Iterator[bool]:
        """Point Prefect at this server for the block; yields False (and stops it) when Prefect
        is configured otherwise, e.g. by a profile's API URL, or the server did not come up."""
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
            PREFECT_SERVER_EPHEMERAL_ENABLED,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
            PREFECT_UI_URL,
            temporary_settings,
        )

        wanted = not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value()
        timeout = float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        if not (wanted and self.wait_until_ready(timeout)):
            self.stop()
            yield False
            return
        try:
            # A temporary server serves no UI, so no "View at" link to a dead page; and it dies
            # with the run, so nothing would watch for the flow's heartbeats (which detect
            # crashed runs on a server that outlives them; stopping their thread costs ~1 s).
            updates = {
                PREFECT_API_URL: self.api_url,
                PREFECT_UI_URL: "",
                PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
            }
            with temporary_settings(updates=updates):
                try:
                    yield True
                finally:
                    # What Prefect still queues for the API goes out before the server stops
                    # (as in Prefect's test harness); afterwards it would retry a closed port.
                    APILogWorker.drain_all()
                    EventsWorker.drain_all()
        finally:
            self.stop()
