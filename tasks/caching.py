"""Content-addressed caching on top of Prefect's cache machinery.

Prefect's default key (inputs + task source + run id) reuses nothing across runs and ignores
the library code a task calls. Here a key is the hash of the task's inputs (upstream records
carry content hashes, never bare paths), its settings, the source of the task function and of
every helper in `tasks/` it calls, and a fingerprint of the `catdog` modules it runs. Before
Prefect looks a key up, the policy checks that the folder the key names still holds the files
its record lists; if not, the stale entry is evicted and the task recomputes instead of
returning a record that points at nothing.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import json
import logging
import os
import shutil
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.locking.filesystem import FileSystemLockManager
from prefect.transactions import get_transaction

from catdog.hashing import HashMemo, code_fingerprint, sha256_json
from catdog.io import atomic_directory, atomic_write_json, replace_directory
from catdog.layout import RECORD_FILE, Layout

NOT_KEYED = ("artifacts",)  # where results live does not change what they are
log = logging.getLogger(__name__)


def _memo(layout: Layout) -> HashMemo:
    return HashMemo(layout.hash_memo)


@dataclass
class ContentAddressed(CachePolicy):
    """Key = hash(stage, inputs, code fingerprint[, source fingerprint])."""

    stage: str = ""
    code: tuple[str, ...] = ()
    name_input: str | None = None  # input naming a per-model sub-folder, e.g. "model"
    unkeyed: tuple[str, ...] = ()  # inputs the fingerprint stands in for
    fingerprint: Callable[[dict[str, Any]], Any] | None = field(default=None, repr=False)

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        skip = (*NOT_KEYED, *self.unkeyed)
        keyed = {name: _identity(value) for name, value in inputs.items() if name not in skip}
        parts: dict[str, Any] = {
            "stage": self.stage,
            "inputs": keyed,
            "code": code_fingerprint(*self.code) if self.code else "",
            "task": task_fingerprint(task_ctx.task.fn),
        }
        if self.fingerprint is not None:
            parts["source"] = self.fingerprint(inputs)
            parts["task"] += task_fingerprint(self.fingerprint)
        key = f"{self.stage}-{sha256_json(parts)[:32]}"
        layout = Layout.at(inputs["artifacts"])
        name = inputs.get(self.name_input) if self.name_input else None
        if not outputs_intact(layout, layout.output_dir(self.stage, key, name)):
            evict(layout, key)
        return key


def _identity(value: Any) -> Any:
    """What an input contributes to a key: a record that names its content (a downloaded
    archive) by that content, anything else as it is."""
    if isinstance(value, dict) and "content" in value:
        return {"content": value["content"]}
    return value


@cache
def task_fingerprint(function: Callable[..., Any]) -> str:
    """Hash of a function's source and of every function of the `tasks` package it names,
    transitively: editing a task body, or a helper it calls, changes its stage's key (and so
    every later stage's), while the stages before it keep theirs."""
    seen: dict[str, str] = {}
    pending = [function]
    while pending:
        current = pending.pop()
        name = f"{current.__module__}.{current.__qualname__}"
        if name in seen:
            continue
        tree = ast.parse(textwrap.dedent(_source(current)))
        for node in tree.body:  # the decorator says how the task runs, not what it computes
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                node.decorator_list = []
        # Unparsed, so that comments and formatting do not count as a change.
        seen[name] = sha256_json(ast.unparse(tree))
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        for referenced in names:
            value = current.__globals__.get(referenced)
            if (
                inspect.isfunction(value)
                and value.__module__.split(".")[0] == "tasks"
                and value is not current
            ):
                pending.append(value)
    return sha256_json(sorted(seen.items()))


def _source(function: Callable[..., Any]) -> str:
    """A function's source, also when it came pickled by value (a task sent to a Dask worker
    is): then it is read from the module of that name, as installed on this machine."""
    try:
        return inspect.getsource(function)
    except OSError:
        found: Any = importlib.import_module(function.__module__)
        for part in function.__qualname__.split("."):
            found = getattr(found, part)
        return inspect.getsource(getattr(found, "fn", found))  # a Task wraps its function


def outputs_intact(layout: Layout, folder: Path) -> bool:
    """True when `folder` holds a record and every file it lists, unchanged."""
    record_path = folder / RECORD_FILE
    if not record_path.is_file():
        return False
    try:
        files = json.loads(record_path.read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError):
        return False
    memo = _memo(layout)
    try:
        intact = all(memo.sha256(folder / rel) == digest for rel, digest in files.items())
    except OSError:
        return False
    memo.save()
    return intact


def evict(layout: Layout, key: str) -> None:
    """Forget Prefect's cached result for `key` so that the task runs again."""
    for folder in (layout.cache_keys_dir, layout.results_dir):
        (folder / key).unlink(missing_ok=True)


def current_key() -> str:
    """The cache key of the running task (its transaction key)."""
    transaction = get_transaction()
    if transaction is None or not transaction.key:
        raise RuntimeError("current_key() must be called inside a cached task")
    return transaction.key


@contextmanager
def stage_output(
    layout: Layout, stage: str, name: str | None = None, *, resumable: bool = False
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A working folder that becomes the stage's output folder, with its record, on success.

    Yields (folder, record); the caller writes files into the folder and facts into the
    record. Every file's hash is added to the record before the folder is moved into place.
    A `resumable` working folder has a stable name and survives a failure, so that a retry
    or the next run can continue from what it holds (training checkpoints); otherwise it is
    temporary and removed on failure.
    """
    key = current_key()
    final = layout.output_dir(stage, key, name)
    if final.exists():
        shutil.rmtree(final)  # stale, damaged, or refreshed on request: recompute it whole
    record: dict[str, Any] = {"key": key, "stage": stage}
    if resumable:
        work = final.parent / f".{final.name}.partial"
        work.mkdir(parents=True, exist_ok=True)
        yield work, record
        _seal(layout, work, record)
        replace_directory(work, final)
    else:
        with atomic_directory(final) as work:
            yield work, record
            _seal(layout, work, record)
    # Hashes were taken under the working name; remember them under the final one.
    outputs_intact(layout, final)
    record["dir"] = layout.relative(final)


def _seal(layout: Layout, folder: Path, record: dict[str, Any]) -> None:
    memo = _memo(layout)
    record["files"] = {
        path.relative_to(folder).as_posix(): memo.sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    atomic_write_json(folder / RECORD_FILE, record)


# A lock held from another host (workers of a Dask cluster sharing the artifacts folder) cannot
# be checked by pid: its holder refreshes the lock's owner file every HEARTBEAT_SECONDS, and a
# lock whose owner file is older than this many seconds counts as abandoned.
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


class _Heartbeat:
    """One daemon thread per process that touches the owner files of the locks it holds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._held: set[Path] = set()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, owner_file: Path) -> None:
        with self._guard:
            self._held.add(owner_file)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._beat, name="lock-heartbeat", daemon=True
                )
                self._thread.start()

    def drop(self, owner_file: Path) -> None:
        with self._guard:
            self._held.discard(owner_file)

    def _beat(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._guard:
                held = list(self._held)
            for owner_file in held:
                with contextlib.suppress(OSError):
                    os.utime(owner_file)


HEARTBEAT = _Heartbeat(HEARTBEAT_SECONDS)


class CrashSafeLockManager(FileSystemLockManager):
    """File locks that a crashed run cannot leave behind.

    Prefect's file locks never expire by default, so a run killed while holding one (a kill,
    an out-of-memory crash, a reboot) would make every later run wait forever. Each lock here
    gets a sidecar naming the process that holds it ("host:pid"), which that process touches
    every HEARTBEAT_SECONDS. A lock is released when its process, on this machine, no longer
    exists; or, held from another machine, when its sidecar has not been touched for
    `hold_timeout()` seconds.
    """

    def _owner_path(self, key: str) -> Path:
        return Path(f"{self._lock_path_for_key(key)}.owner")

    def _get_lock_info(self, key: str, use_cache: bool = True) -> Any:
        try:
            return super()._get_lock_info(key, use_cache=use_cache)
        except ValueError:
            # Prefect creates the lock file, then writes its holder into it: a second run that
            # reads it in between finds it empty. The lock is held, by a holder not named yet.
            return {"holder": "", "expiration": None, "path": self._lock_path_for_key(key)}

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            owner_file = self._owner_path(key)
            owner_file.write_text(f"{socket.gethostname()}:{os.getpid()}")
            HEARTBEAT.hold(owner_file)
        return acquired

    def release_lock(self, key: str, holder: str) -> None:
        super().release_lock(key, holder)
        HEARTBEAT.drop(self._owner_path(key))
        self._owner_path(key).unlink(missing_ok=True)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        if not super().is_locked(key, use_cache=use_cache):
            return False
        owner_file = self._owner_path(key)
        try:
            owner = owner_file.read_text()
            age = time.time() - owner_file.stat().st_mtime
        except OSError:
            return True  # just taken, owner not written yet: alive
        if _holder_is_gone(owner, age):
            log.warning("releasing the lock on %s left by %s, which is gone", key, owner)
            Path(self._lock_path_for_key(key)).unlink(missing_ok=True)
            owner_file.unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return True


def _holder_is_gone(owner: str, seconds_since_heartbeat: float) -> bool:
    """True when `owner` ("host:pid") names a process of this machine that has ended (or is
    a zombie nobody reaped), or a process elsewhere whose heartbeat stopped."""
    host, _, pid = owner.partition(":")
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
    try:  # the third field of /proc/PID/stat is the state; Z: exited, not yet reaped
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state == "Z"


def bind_to_artifacts(task: Task, layout: Layout, *, refresh: bool = False, **options: Any) -> Task:
    """The task with its results, cache keys and locks stored under the artifacts folder.

    SERIALIZABLE isolation with file locks makes a second concurrent run wait for the first
    one's result for the same key and reuse it, instead of computing it twice.
    """
    policy = task.cache_policy
    if isinstance(policy, ContentAddressed):
        policy = policy.configure(
            key_storage=layout.cache_keys_dir,
            lock_manager=CrashSafeLockManager(lock_files_directory=layout.locks_dir),
            isolation_level="SERIALIZABLE",
        )
    return task.with_options(
        cache_policy=policy,
        result_storage=layout.results_dir,
        result_serializer="json",
        persist_result=True,
        refresh_cache=refresh,
        **options,
    )
