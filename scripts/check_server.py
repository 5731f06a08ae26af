"""Run the flow against a real `prefect server start` and check what the UI will show.

Starts a throwaway Prefect server on a free local port (its own PREFECT_HOME, telemetry off),
runs `flows/train_flow.py` on a tiny generated dataset against it, then reads back through the
API: the flow run (state, name, tags), its task runs, and its artifacts by key (tables,
embedded images, the report, training progress). Prints a short report; exits 1 if anything is
missing, 2 if the server or the flow could not run.

    .venv/bin/python scripts/check_server.py              # about a minute on two CPU cores
    .venv/bin/python scripts/check_server.py --rerun      # and check a rerun is all cache hits
    .venv/bin/python scripts/check_server.py --keep-server   # leave it up to look at the UI
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from catdog.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
FLOW = ROOT / "flows" / "train_flow.py"
TABLES = ("label-counts", "model-leaderboard")
IMAGES = ("sample-grid", "augmentation-preview", "training-curves")
MARKDOWN = ("run-report",)
EMBEDDED_PNG = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


@dataclass
class Check:
    """The outcome of the checks: a line per fact, and the problems found."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def ok(self, condition: bool, good: str, bad: str | None = None) -> bool:
        if condition:
            self.lines.append(f"  ok    {good}")
        else:
            self.lines.append(f"  FAIL  {bad or good}")
            self.problems.append(bad or good)
        return condition


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(api_url: str, home: Path) -> dict[str, str]:
    """The environment for the server, the flow and this script's client alike."""
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
    return env


def start_server(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`prefect server start` in its own process group (so that it can be stopped whole)."""
    command = [sys.executable, "-m", "prefect", "server", "start"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_healthy(api_url: str, server: subprocess.Popen[bytes], timeout: float) -> float:
    """Seconds until /api/health answers true; RuntimeError on timeout or server exit."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if json.loads(response.read()) is True:
                    return time.monotonic() - started
        except (OSError, ValueError):
            pass
        time.sleep(1)
    raise RuntimeError(f"no answer from {api_url}/health within {timeout:.0f} s")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def tiny_dataset(archive: Path, per_class: int = 12) -> Path:
    """A zip in the official layout: {train,validation}/{cats,dogs}/*.jpg, told apart by light."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(archive, "w") as handle:
        for split, count in (("train", per_class), ("validation", per_class - 2)):
            for index, name in enumerate(("cats", "dogs")):
                for i in range(count):
                    pixels = rng.integers(0, 80, (30, 40, 3), dtype=np.uint8) + 40 + 130 * index
                    buffer = io.BytesIO()
                    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG")
                    handle.writestr(f"tiny/{split}/{name}/{name}.{i}.jpg", buffer.getvalue())
    return archive


def run_flow(data: Path, artifacts: Path, env: dict[str, str], log: Path, timeout: float) -> int:
    command = [sys.executable, str(FLOW), "--data", str(data), "--models", "model1"]
    command += ["--epochs", "1", "--image-size", "32", "--batch-size", "8"]
    command += ["--artifacts", str(artifacts)]
    with open(log, "ab") as out:
        return subprocess.run(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
        ).returncode


def png_size(markdown: str) -> tuple[int, int] | None:
    """The pixel size of the first embedded PNG in `markdown`, or None if there is none."""
    from PIL import Image

    match = EMBEDDED_PNG.search(markdown)
    if not match:
        return None
    data = base64.b64decode(match.group(1))
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    with Image.open(io.BytesIO(data)) as image:
        return image.size


async def read_run(run_id: UUID) -> tuple[Any, list[Any], list[Any]]:
    """The flow run, its task runs and its artifacts, through the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    async with get_client() as client:
        run = await client.read_flow_run(run_id)
        tasks = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    return run, tasks, artifacts


def check_run(check: Check, run_id: UUID, ui_url: str, fresh: bool) -> None:
    """Check one flow run; a `fresh` run computed everything, a rerun hit every cache."""
    run, tasks, artifacts = asyncio.run(read_run(run_id))
    state = run.state.name if run.state else "none"
    check.lines.append(f"flow run {run.name!r}  {ui_url}/runs/flow-run/{run_id}")
    check.ok(state == "Completed", f"state {state}", f"state {state}, expected Completed")
    check.ok("on tiny.zip" in run.name, "named by models, data, seed and date", "unnamed run")
    check.ok("catdog" in run.tags, f"tags {run.tags}", f"tags {run.tags}, expected 'catdog'")
    states: dict[str, int] = {}
    for task in tasks:
        name = task.state.name if task.state else "none"
        states[name] = states.get(name, 0) + 1
    check.lines.append(f"  tasks {len(tasks)}: {states}")
    expected = "Completed" if fresh else "Cached"
    # The data checks, the gate and the report run every time (the stage table's uncached
    # stages; the proposal only when approval is asked for).
    always_run = tuple(s.task for s in STAGES if not s.cached and s.name != "propose")
    check.ok(
        all(any(t.name.startswith(name) for t in tasks) for name in always_run),
        f"{', '.join(always_run)} in the run graph",
        f"one of {', '.join(always_run)} missing from the run's tasks",
    )
    stages = [t for t in tasks if not t.name.startswith(always_run)]
    wrong = [t.name for t in stages if not t.state or t.state.name != expected]
    check.ok(bool(stages) and not wrong, f"every stage task {expected}", f"not {expected}: {wrong}")
    by_key = {artifact.key: artifact for artifact in artifacts if artifact.key}
    wanted = (*TABLES, *IMAGES, *MARKDOWN) if fresh else ("model-leaderboard", "run-report")
    for key in wanted:
        artifact = by_key.get(key)
        if not check.ok(artifact is not None, f"artifact {key}", f"artifact {key} missing"):
            continue
        assert artifact is not None
        if key in TABLES:
            rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
            check.ok(
                artifact.type == "table" and len(rows) > 0,
                f"  table, {len(rows)} row(s): {list(rows[0])}",
                f"{key}: type {artifact.type}, {len(rows)} rows",
            )
        elif key in IMAGES:
            size = png_size(str(artifact.data))
            check.ok(
                artifact.type == "markdown" and size is not None,
                f"  markdown with an embedded {size[0]}x{size[1]} PNG"
                if size
                else "  markdown with a PNG",
                f"{key}: no embedded PNG (type {artifact.type})",
            )
        else:
            text = str(artifact.data)
            check.ok(
                artifact.type == "markdown" and len(text) > 100,
                f"  markdown, {len(text)} characters",
                f"{key}: type {artifact.type}, {len(text)} characters",
            )
    if fresh:
        progress = [a for a in artifacts if a.type == "progress"]
        done = [a for a in progress if float(a.data or 0) >= 100.0]
        check.ok(
            bool(progress) and len(done) == len(progress),
            f"{len(progress)} progress artifact(s), all at 100%",
            f"progress artifacts: {[(a.description, a.data) for a in progress]}",
        )


def summary_run_id(artifacts: Path) -> UUID:
    return UUID(json.loads((artifacts / "summary.json").read_text())["run"]["id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--workdir", type=Path, help="keep server home, data and artifacts here")
    parser.add_argument("--rerun", action="store_true", help="run twice; the rerun all cached")
    parser.add_argument(
        "--keep-server", action="store_true", help="leave the server running at the end"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per flow run (600)")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="catdog-server-"))
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port()
    ui_url = f"http://127.0.0.1:{port}"
    api_url = f"{ui_url}/api"
    env = server_env(api_url, workdir / "prefect-home")
    os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "PREFECT_HOME")})
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    print(f"work folder: {workdir}\nserver: {ui_url} (log {workdir / 'server.log'})")

    server = start_server(port, env, workdir / "server.log")
    check = Check()
    try:
        try:
            seconds = wait_healthy(api_url, server, timeout=180)
        except RuntimeError as error:
            print(f"error: {error}; see {workdir / 'server.log'}", file=sys.stderr)
            return 2
        print(f"healthy after {seconds:.0f} s")
        data = tiny_dataset(workdir / "tiny.zip")
        artifacts = workdir / "artifacts"
        runs = 2 if args.rerun else 1
        for number in range(runs):
            started = time.monotonic()
            code = run_flow(data, artifacts, env, workdir / "flow.log", args.timeout)
            took = time.monotonic() - started
            print(f"flow run {number + 1}: exit code {code} after {took:.0f} s")
            if code != 0:
                print(f"error: the flow failed; see {workdir / 'flow.log'}", file=sys.stderr)
                return 2
            check_run(check, summary_run_id(artifacts), ui_url, fresh=number == 0)
    finally:
        if args.keep_server and server.poll() is None:
            print(f"server left running: {ui_url} (pid {server.pid}; stop: kill -- -{server.pid})")
        else:
            stop_server(server)
    print("\n".join(check.lines))
    if check.problems:
        print(f"{len(check.problems)} problem(s): " + "; ".join(check.problems))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
