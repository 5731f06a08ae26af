"""How the flow submits its stages, and how a run ends.

`Pipeline.submit` runs one stage's task as the stage table says (its cache, retries, run name
and GPU placement); `settle` waits for what was submitted and decides how the run ends: the
first stage that failed is raised as one sentence naming the stage and its cause, and once
something has failed, the rest is stopped (queued stages do not start, a training stops after
its current epoch) instead of running to the end.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import logging
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run

import tasks
from catdog.errors import CatdogError, RunStopped, StageFailed, StageInputError
from catdog.heap import run_heap
from catdog.layout import Layout
from catdog.mirror import send_stop_request, withdraw_stop_request
from catdog.processes import mark_running, unmark_running
from catdog.stage_records import Record
from catdog.stages import BY_TASK, STAGE_NAMES, STAGES, refreshed, stage
from catdog.summary import TaskOutcome
from flows.console import one_line
from flows.runners import on_a_gpu
from tasks.caching import bind_to_artifacts

log = logging.getLogger(__name__)


def stage_tasks() -> dict[str, Task]:
    """Every stage's task, by the task name the stage table gives it.

    A task declares itself with `@stage_task(stage)` in any module of `tasks/`, which names it
    from the table; a stage of the table with no such task is an error here, at import.
    """
    found: dict[str, Task] = {}
    for module in pkgutil.iter_modules(tasks.__path__):
        for value in vars(importlib.import_module(f"tasks.{module.name}")).values():
            if isinstance(value, Task) and value.name in BY_TASK:
                found[value.name] = value
    missing = [entry.task for entry in STAGES if entry.task not in found]
    if missing:
        raise ImportError(f"no task in tasks/ declares the stages' tasks {', '.join(missing)}")
    return found


TASKS = stage_tasks()


@dataclass(frozen=True)
class Ending:
    """How one submitted task run ended."""

    state: str  # the name of its final state: "Completed", "Cached", "Failed", "NotReady"...
    result: Any = None
    error: BaseException | None = None

    @property
    def failed_first(self) -> bool:
        """A failure of its own, not a stop because something else failed first."""
        return self.error is not None and not isinstance(self.error, RunStopped)


def ending(future: PrefectFuture[Any]) -> Ending:
    """Wait for `future` and say how its task run ended."""
    wrapped = getattr(future, "wrapped_future", None)
    if wrapped is not None and wrapped.cancelled():
        return Ending("Cancelled")
    future.wait()
    if getattr(wrapped, "status", None) == "error":  # Dask lost it before it returned a state
        return Ending("Crashed", error=wrapped.exception())
    state = future.state
    if state.is_completed():
        return Ending(state.name or "Completed", result=future.result())
    if state.is_failed() or state.is_crashed():
        try:
            state.result()
        except BaseException as error:  # the task's own exception, as it raised it
            return Ending(state.name or "Failed", error=error)
        return Ending(state.name or "Failed", error=RuntimeError(state.message or "failed"))
    return Ending(state.name or "Pending")  # never ran: an earlier stage did not complete


def settle(
    futures: Mapping[str, PrefectFuture[Any]], stop: Callable[[str], None]
) -> dict[str, Ending]:
    """Wait for every future; the endings by label, or the first failure raised.

    As soon as one fails, `stop(label)` is called once, so that the run's other stages stop
    (those queued do not start; a running training stops after its epoch), and futures that
    have not started are cancelled; the rest are still waited for, so that nothing keeps
    running after the run has ended.

    Args:
        futures: Task run futures by label, in stage order.
        stop: Called with the label of the first failure seen.

    Raises:
        StageInputError: The first failure, in stage order, was a `CatdogError` (bad input).
        StageFailed: It was anything else.
    """
    labels = {id(future): label for label, future in futures.items()}
    endings: dict[str, Ending] = {}
    stopped = False
    for future in as_completed(list(futures.values())):
        label = labels[id(future)]
        endings[label] = ending(future)
        if endings[label].failed_first and not stopped:
            stopped = True
            stop(label)
            for other in futures.values():
                # A thread pool's queued task can be dropped before it starts; Dask's are told
                # by `stop` (cancelling a Dask future would not wait for a running task).
                wrapped = getattr(other, "wrapped_future", None)
                if isinstance(wrapped, concurrent.futures.Future):
                    wrapped.cancel()
    # The first in stage order (the table's), then in submission order among the models.
    failures = sorted((label for label in futures if endings[label].failed_first), key=_stage_rank)
    if failures:
        raise failure(failures[0], endings[failures[0]].error)
    return {label: endings[label] for label in futures}


def _stage_rank(label: str) -> int:
    """Where the stage that `label` runs comes in the pipeline (any other label: last)."""
    task = label.partition("[")[0]
    known = BY_TASK.get(task)
    return STAGE_NAMES.index(known.name) if known else len(STAGE_NAMES)


def failure(label: str, cause: BaseException | None) -> StageFailed:
    """The run's error for stage `label` failing with `cause`: one line, the library's own
    message for bad input (exit code 2), the exception's type too for anything else."""
    text = one_line(cause)
    if not isinstance(cause, CatdogError):  # a bug, or the machine: its type says which
        text = f"{type(cause).__name__ if cause is not None else 'Error'}: {text}"
    # A message that names its stage already ("decode_images (train split at 160x160): the
    # disk filled up...") is the whole sentence.
    sentence = text if text.startswith(label.partition("[")[0]) else f"{label} failed: {text}"
    input_fault = isinstance(cause, CatdogError) and cause.exit_code == 2
    error = StageInputError(sentence) if input_fault else StageFailed(sentence)
    error.__cause__ = cause
    return error


class Pipeline:
    """The stages of one run: submitted as the stage table says, settled in stage order."""

    def __init__(self, layout: Layout, *, refresh: str | None, retries: Mapping[str, int]):
        self.layout = layout
        self.refresh = refresh
        self.retries = dict(retries)  # by the flow parameter the stage table names
        self.futures: dict[str, PrefectFuture[Any]] = {}
        self.outcomes: dict[str, TaskOutcome] = {}
        self._marker: Path | None = None
        self._heap = contextlib.ExitStack()

    def submit(self, name: str, **inputs: Any) -> PrefectFuture[Any]:
        """Submit stage `name`'s task; what it returns is its future, which later stages take
        as input. A stage asked for twice with the same run name (two models that read the
        same decoded images) is submitted once."""
        entry = stage(name)
        label = entry.label_for(inputs)
        if label in self.futures:
            return self.futures[label]
        task = bind_to_artifacts(
            TASKS[entry.task], self.layout, refresh=refreshed(name, self.refresh)
        )
        if entry.retries:
            task = task.with_options(retries=self.retries[entry.retries])
        with on_a_gpu(entry.gpu):
            self.futures[label] = task.submit(**inputs, artifacts=self.layout.location)
        return self.futures[label]

    def settle(self) -> None:
        """Wait for every stage submitted since the last call; raise the first failure (see
        `settle`). Afterwards `outcomes` says how each task run ended."""
        pending = {label: f for label, f in self.futures.items() if label not in self.outcomes}
        for label, end in settle(pending, self._stop).items():
            record = end.result if isinstance(end.result, Record) else None
            self.outcomes[label] = TaskOutcome(
                end.state,
                # Stages' records and the gate's say how long they took.
                seconds=getattr(end.result, "seconds", None),
                dir=record.dir if record else None,
            )

    def results(self, **futures: Any) -> dict[str, Any]:
        """What settled futures returned, by name: a future, or a dict of them, each (records
        of several stages' types, hence Any)."""

        def result(value: Any) -> Any:
            if value is None:  # a stage this run does not have
                return None
            if isinstance(value, dict):
                return {name: result(item) for name, item in value.items()}
            return value.result()

        return {name: result(value) for name, value in futures.items()}

    def _stop_request(self) -> Path:
        return self.layout.stop_request(str(flow_run.get_id() or "local"))

    def _stop(self, label: str) -> None:
        request = self._stop_request()
        reason = f"the run stopped after {label} failed"
        try:
            request.parent.mkdir(parents=True, exist_ok=True)
            request.write_text(f"{reason}\n", encoding="utf-8")
        except OSError as error:  # the disk that failed the stage may be full: still report it
            log.warning("could not ask the run's other stages to stop (%s)", error)
        send_stop_request(self.layout, request, reason)

    def __enter__(self) -> Pipeline:
        # Pruning (by any run or `cache prune`) waits while this marker says the run is on.
        self._marker = mark_running(self.layout.running_dir, str(flow_run.get_id() or "local"))
        self._heap.enter_context(run_heap())  # each stage settles it as it starts (stage_output)
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Every task has ended by now (settle waits for all), so none still needs to see it.
        withdraw_stop_request(self.layout, self._stop_request())
        self._stop_request().unlink(missing_ok=True)
        if self._marker is not None:
            unmark_running(self._marker)
        self._heap.close()
