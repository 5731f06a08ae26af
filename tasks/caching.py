"""Content-addressed caching on top of Prefect's cache machinery, and the stages' output folders.

Prefect's default key (inputs + task source + run id) reuses nothing across runs and ignores
the library code a task calls. Here a key is the hash of the task's inputs (upstream records
carry content hashes, never bare paths), its settings, the source of the task function and of
every helper in `tasks/` it calls, and a fingerprint of the `catdog` modules its stage runs (as
the stage table says). Before Prefect looks a key up, the policy checks that the folder the key
names still holds the files its record lists; if not, the stale entry is evicted and the task
recomputes instead of returning a record that points at nothing.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import logging
import os
import shutil
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NONE, CachePolicy
from prefect.context import TaskRunContext
from prefect.runtime import flow_run
from prefect.transactions import get_transaction

from catdog.errors import RunStopped
from catdog.hashing import HashMemo, code_digest, code_fingerprint, sha256_json
from catdog.heap import settle as settle_heap
from catdog.io import atomic_directory, atomic_write_json, replace_directory
from catdog.layout import RECORD_FILE, Layout
from catdog.mirror import (
    adopt_sealed,
    fetch_inputs,
    fetch_output,
    forget_checkpoints,
    push_output,
    read_record,
    stored_stop_request,
)
from catdog.stage_records import Record
from catdog.stages import Stage, stage, stage_of_task
from tasks.locks import ArtifactsLockManager, StoreLockManager

log = logging.getLogger(__name__)

NOT_KEYED = ("artifacts",)  # where results live does not change what they are

# A task's inputs (or a flow's parameters) by name, as Prefect hands them to a cache policy:
# whatever the task takes.
Inputs = dict[str, Any]


def _memo(layout: Layout) -> HashMemo:
    return HashMemo(layout.hash_memo)


@dataclass
class ContentAddressed(CachePolicy):
    """Key = hash(stage, its record's class, inputs, stage code, task code[, source
    fingerprint])."""

    stage: str = ""
    unkeyed: tuple[str, ...] = ()  # inputs the fingerprint stands in for
    fingerprint: Callable[[Inputs], Any] | None = field(default=None, repr=False)
    refresh: bool = False  # recomputed on request (--refresh): a store's copy is replaced

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: Inputs,
        flow_parameters: Inputs,
        **kwargs: Any,
    ) -> str | None:
        entry = stage(self.stage)
        skip = (*NOT_KEYED, *self.unkeyed)
        keyed = {name: _identity(value) for name, value in inputs.items() if name not in skip}
        task = task_fingerprint(task_ctx.task.fn)
        if self.fingerprint is not None:
            task += task_fingerprint(self.fingerprint)
        parts = {
            "stage": entry.name,
            # A stored result is read back as the class of this name: a result of a class that
            # moved or was renamed would come back a bare dict, so it is another key.
            "record": f"{entry.record.__module__}.{entry.record.__qualname__}",
            "inputs": keyed,
            "code": code_fingerprint(*entry.code),
            "task": task,
        }
        layout = Layout.at(inputs["artifacts"])
        try:
            if self.fingerprint is not None:
                if layout.store is not None:  # it reads the inputs: here, or from the store
                    fetch_inputs(layout, inputs.values())
                parts["source"] = self.fingerprint(inputs)
        except Exception as error:  # Prefect would log it and run the task without a key
            _STORE_FAILURES[task_ctx.task_run.id] = error
            return None
        key = f"{entry.name}-{sha256_json(parts)[:32]}"
        name = inputs.get("model") if entry.per_model else None
        folder = layout.output_dir(entry.name, key, name)
        # Another run on this host computing this key holds its lock: what it commits is
        # not stale. (A run on another host: this one waits for the lease, then adopts.)
        if isinstance(self.lock_manager, ArtifactsLockManager) and self.lock_manager.held_here(key):
            return key
        try:
            if layout.store is None:
                if not outputs_intact(layout, folder):
                    evict(layout, key)
            elif not self._found(layout, entry, key, folder):
                # The task runs here: what it reads, this host may not have computed.
                fetch_inputs(layout, inputs.values())
                if not self.refresh:  # another host may seal it while this one waits
                    _AWAITED[key] = (layout, entry, folder)
        except Exception as error:  # Prefect would log it and run the task without a key
            _STORE_FAILURES[task_ctx.task_run.id] = error
        return key

    def _found(self, layout: Layout, entry: Stage, key: str, folder: Path) -> bool:
        """With a store: whether the output is here or in the store (fetched, checked), with
        the cache record Prefect looks for; False when the task must compute it."""
        store = layout.store
        assert store is not None
        if self.refresh:  # recomputed on request: the store's copy goes, the new one is sealed
            store.delete(layout.relative(folder / RECORD_FILE))
            evict(layout, key)
            return False
        if outputs_intact(layout, folder):
            if not (layout.cache_keys_dir / key).is_file():
                remember(layout, entry, key, folder)  # fetched here as a later stage's input
            push_output(layout, folder)  # a seal whose upload failed goes up now (else: no-op)
            return True
        if fetch_output(layout, folder):  # sealed by another host
            remember(layout, entry, key, folder)
            return True
        evict(layout, key)
        return False


# Entries of a store that this process found nowhere, by key: once it holds an entry's lock,
# another host may have sealed it meanwhile (see `adopt_if_sealed`).
_AWAITED: dict[str, tuple[Layout, Stage, Path]] = {}


def adopt_if_sealed(key: str) -> None:
    """Run once this process holds the lock of a store's entry, before Prefect looks for its
    cache record: if another host sealed the entry while this one waited, fetch it, so that
    the task is `Cached` instead of computing it again."""
    awaited = _AWAITED.pop(key, None)
    if awaited is None:
        return
    layout, entry, folder = awaited
    try:
        sealed = outputs_intact(layout, folder) or fetch_output(layout, folder)
        if sealed and not (layout.cache_keys_dir / key).is_file():
            remember(layout, entry, key, folder)
    except Exception as error:  # computing it again is always right; the store's failure
        log.warning("%s: could not look for it in the store (%s); computing it", key, error)


# A task run whose cache key could not be computed (an input that is nowhere, the store failing):
# raised by its stage_output, so that the task ends in its own one `error:` line.
_STORE_FAILURES: dict[Any, BaseException] = {}


def _identity(value: Any) -> Any:
    """What an input contributes to a key: a record what it names (a downloaded archive by its
    content), anything else as it is."""
    if isinstance(value, Record):
        return value.identity()
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
        seen[name] = code_digest(tree)
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
    """True when `folder` holds a record and every file it lists, unchanged, and every piece
    pack it reads from (`piece_files`, relative to the artifacts root)."""
    record_path = folder / RECORD_FILE
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    listed = [(folder / rel, digest) for rel, digest in record.get("files", {}).items()]
    listed += [
        (layout.resolve(rel), digest) for rel, digest in record.get("piece_files", {}).items()
    ]
    memo = _memo(layout)
    try:
        intact = all(memo.sha256(path) == digest for path, digest in listed)
    except OSError:
        return False
    memo.save()
    return intact


def evict(layout: Layout, key: str) -> None:
    """Forget Prefect's cached result for `key` so that the task runs again."""
    for folder in (layout.cache_keys_dir, layout.results_dir):
        (folder / key).unlink(missing_ok=True)


def remember(layout: Layout, entry: Stage, key: str, folder: Path) -> None:
    """Give Prefect the cache record of an output fetched from the store: the stage's typed
    record, rebuilt from its `record.json`, as the task itself would have returned it."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore
    from prefect.serializers import JSONSerializer

    record = _record_of(layout, entry, folder)
    ResultStore(
        result_storage=LocalFileSystem(basepath=str(layout.results_dir)),
        metadata_storage=LocalFileSystem(basepath=str(layout.cache_keys_dir)),
        serializer=JSONSerializer(),
    ).write(obj=record, key=key)


def _record_of(layout: Layout, entry: Stage, folder: Path) -> Any:
    """The stage's typed record of the output at `folder`, from its `record.json`."""
    facts = read_record(folder)
    facts.pop("stage", None)
    return entry.record(**{**facts, "dir": layout.relative(folder)})


def current_key() -> str:
    """The cache key of the running task (its transaction key)."""
    transaction = get_transaction()
    if transaction is None or not transaction.key:
        raise RuntimeError("current_key() must be called inside a cached task")
    return transaction.key


def raised(state: Any) -> BaseException | None:
    """The exception a failed task run raised, for a retry condition (None if none)."""
    try:
        state.result()
    except Exception as error:
        return error
    return None


def check_not_stopped(layout: Layout) -> None:
    """Raise RunStopped if another stage of this run failed and the run is stopping."""
    run_id = flow_run.get_id()
    if not run_id:
        return
    request = layout.stop_request(str(run_id))
    if request.is_file():
        raise RunStopped(f"stopped: {request.read_text(encoding='utf-8').strip()}")
    # On a host that shares only the store with the run's other stages.
    if (reason := stored_stop_request(layout, request)) is not None:
        raise RunStopped(f"stopped: {reason}")


@dataclass
class StageOutput:
    """A stage's working folder, the facts its task adds, and then its sealed record."""

    folder: Path
    facts: dict[str, object] = field(default_factory=dict)  # the record's fields, by name
    record: Any = None


def stage_task(
    name: str,
    *,
    fingerprint: Callable[[Inputs], Any] | None = None,
    unkeyed: tuple[str, ...] = (),
    **options: Any,
) -> Callable[[Callable[..., Any]], Task]:
    """Make a function stage `name`'s Prefect task: its name, run name and cache policy as
    the stage table says.

    Args:
        name: The stage.
        fingerprint: What else identifies the result (a source archive, a weights file):
            computed from the inputs, added to the key.
        unkeyed: Inputs the fingerprint stands in for.
        **options: Further `prefect.task` options (retry delays and conditions).
    """
    entry = stage(name)
    if entry.cached:
        options["cache_policy"] = ContentAddressed(
            stage=name, fingerprint=fingerprint, unkeyed=unkeyed
        )
    else:
        options.update(cache_policy=NONE, persist_result=False)
    return task(name=entry.task, task_run_name=entry.label or None, **options)


def current_stage() -> Stage:
    """The stage of the running task."""
    context = TaskRunContext.get()
    if context is None:
        raise RuntimeError("current_stage() must be called inside a stage's task")
    return stage_of_task(context.task.name)


@contextmanager
def stage_output(
    layout: Layout, model: str | None = None, *, resumable: bool = False
) -> Iterator[StageOutput]:
    """A working folder that becomes the running stage's output folder, with its record, on
    success.

    The task writes files into `out.folder` and facts into `out.facts` (the fields of the
    stage's record type); on success every file's hash goes into `record.json`, the folder is
    moved into place and `out.record` is the stage's typed record. A `resumable` working
    folder has a stable name and survives a failure, so that a retry or the next run can
    continue from what it holds (training checkpoints); otherwise it is temporary and removed
    on failure. A run that is stopping (another stage failed) stops here, before any work.
    """
    started = time.perf_counter()
    settle_heap()  # what earlier stages left alive is walked once, not at every collection
    context = TaskRunContext.get()
    if context is not None and (failure := _STORE_FAILURES.pop(context.task_run.id, None)):
        raise failure
    check_not_stopped(layout)
    entry = current_stage()
    key = current_key()
    final = layout.output_dir(entry.name, key, model)
    if final.exists():
        shutil.rmtree(final)  # stale, damaged, or refreshed on request: recompute it whole
    if resumable:
        work = final.parent / f".{final.name}.partial"
        work.mkdir(parents=True, exist_ok=True)
        out = StageOutput(work)
        yield out
        entry.record(key=key, dir="", **out.facts)  # facts that do not fit fail before the move
        files = _seal(layout, entry, key, out, started)
        replace_directory(work, final)
    else:
        with atomic_directory(final) as work:
            out = StageOutput(work)
            yield out
            entry.record(key=key, dir="", **out.facts)
            files = _seal(layout, entry, key, out, started)
    # Hashes were taken under the working name; a rename keeps a file's inode, size and
    # times, so they are remembered under the final one without reading the files again.
    memo = _memo(layout)
    for relative, digest in files.items():
        memo.note(final / relative, digest, os.stat(final / relative))
    memo.save()
    if not push_output(layout, final) and adopt_sealed(layout, final):
        # Another host sealed this output first: the store's copy is the one every host uses.
        out.record = _record_of(layout, entry, final)
    else:
        out.record = entry.record(
            key=key,
            dir=layout.relative(final),
            files=files,
            seconds=time.perf_counter() - started,
            **out.facts,
        )
    if resumable:
        forget_checkpoints(layout, final.parent / f".{final.name}.partial")


def _seal(
    layout: Layout, entry: Stage, key: str, out: StageOutput, started: float
) -> dict[str, str]:
    memo = _memo(layout)
    files = {
        path.relative_to(out.folder).as_posix(): memo.sha256(path)
        for path in sorted(out.folder.rglob("*"))
        if path.is_file()
    }
    record = {
        "stage": entry.name,
        "key": key,
        "files": files,
        "seconds": time.perf_counter() - started,
        **out.facts,
    }
    atomic_write_json(out.folder / RECORD_FILE, record)
    return files


def bind_to_artifacts(task: Task, layout: Layout, *, refresh: bool = False, **options: Any) -> Task:
    """The task with its results, cache keys and locks stored under the artifacts folder.

    SERIALIZABLE isolation with file locks makes a second concurrent run wait for the first
    one's result for the same key and reuse it, instead of computing it twice.
    """
    policy = task.cache_policy
    if not isinstance(policy, ContentAddressed):
        return task.with_options(**options)
    # Leases need a store that gives each version an ETag and honours If-Match: S3's.
    locks = (
        StoreLockManager(layout.locks_dir, layout.location, adopt_if_sealed)
        if layout.store is not None and layout.store.scheme == "s3"
        else ArtifactsLockManager(layout.locks_dir)
    )
    policy = policy.configure(
        key_storage=layout.cache_keys_dir, lock_manager=locks, isolation_level="SERIALIZABLE"
    )
    policy.refresh = refresh
    return task.with_options(
        cache_policy=policy,
        result_storage=layout.results_dir,
        result_serializer="json",
        persist_result=True,
        refresh_cache=refresh,
        **options,
    )
