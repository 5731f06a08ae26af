"""Which process holds something, and whether it still lives (no Prefect).

Lock files and in-progress run markers name their process as "host:pid:start" and are touched
every HEARTBEAT_SECONDS while it lives. A process on this machine is gone when its pid has
ended (or was given to a later process); one on another machine, when its heartbeat has been
silent for `hold_timeout()` seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

# A lock held from another host cannot be checked by pid: a lock untouched for this many
# seconds counts as abandoned. Raise it where the shared filesystem can stall for longer.
HOLD_TIMEOUT_ENV = "CATDOG_LOCK_HOLD_TIMEOUT"
DEFAULT_HOLD_TIMEOUT = 300.0
HEARTBEAT_SECONDS = 30.0


def hold_timeout() -> float:
    """Seconds without a heartbeat after which another host's lock is abandoned."""
    value = os.environ.get(HOLD_TIMEOUT_ENV, "")
    try:
        return float(value) if value else DEFAULT_HOLD_TIMEOUT
    except ValueError:
        log.warning(
            "%s=%r is not a number of seconds; using %.0f",
            HOLD_TIMEOUT_ENV,
            value,
            DEFAULT_HOLD_TIMEOUT,
        )
        return DEFAULT_HOLD_TIMEOUT


def _started(pid: int | str) -> str:
    """When process `pid` started (clock ticks since boot), "" where /proc cannot tell: with
    the pid it names one process, never a later one given the same pid."""
    try:  # the fields after the command's closing parenthesis; start time is the 20th
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def this_process() -> str:
    """This process as a lock names it: "host:pid:start"."""
    return f"{socket.gethostname()}:{os.getpid()}:{_started(os.getpid())}"


class Heartbeat:
    """One daemon thread per process that touches the lock files it holds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._held: set[Path] = set()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, lock_file: Path) -> None:
        with self._guard:
            self._held.add(lock_file)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._beat, name="lock-heartbeat", daemon=True
                )
                self._thread.start()

    def drop(self, lock_file: Path) -> None:
        with self._guard:
            self._held.discard(lock_file)

    def _beat(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._guard:
                held = list(self._held)
            for lock_file in held:
                with contextlib.suppress(OSError):
                    os.utime(lock_file)


HEARTBEAT = Heartbeat(HEARTBEAT_SECONDS)


def process_is_gone(owner: str, seconds_since_heartbeat: float) -> bool:
    """True when `owner` ("host:pid[:start]") names a process of this machine that has ended
    (or is a zombie nobody reaped, or whose pid now belongs to a later process), or a process
    elsewhere whose heartbeat stopped."""
    host, _, process = owner.partition(":")
    pid, _, started = process.partition(":")
    if host != socket.gethostname():
        return seconds_since_heartbeat > hold_timeout()
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    if started and _started(pid) not in ("", started):
        return True  # the pid was given to another process since
    try:  # the first field after the command is the state; Z: exited, not yet reaped
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state == "Z"


def mark_running(folder: Path, run_id: str) -> Path:
    """Leave a marker saying run `run_id` is in progress in this process, kept fresh by the
    heartbeat until `unmark_running`; a marker whose process is gone counts for nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{run_id}.json"
    staged = folder / f".{run_id}.json.{os.getpid()}.tmp"
    staged.write_text(json.dumps({"process": this_process(), "since": time.time()}))
    staged.replace(marker)
    HEARTBEAT.hold(marker)
    return marker


def unmark_running(marker: Path) -> None:
    HEARTBEAT.drop(marker)
    marker.unlink(missing_ok=True)


def runs_in_progress(folder: Path, *, besides: str | None = None) -> list[str]:
    """The ids of runs whose markers are in `folder` and whose processes live, other than
    `besides`; markers of runs whose processes are gone are removed."""
    live = []
    for marker in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        run_id = marker.name.removesuffix(".json")
        if run_id == besides:
            continue
        try:
            owner = str(json.loads(marker.read_text()).get("process", ""))
            age = time.time() - marker.stat().st_mtime
        except (OSError, ValueError, AttributeError):
            continue  # being written or removed right now
        if owner and process_is_gone(owner, age):
            with contextlib.suppress(OSError):
                marker.unlink()
            continue
        live.append(run_id)
    return live
