"""What a run prints in the terminal when something fails: one line, not a traceback.

Prefect logs every failed task and flow run with its traceback, and every stage that never ran
because an earlier one failed ("Finished in state NotReady"). The Prefect API keeps all of it
(the UI shows it under the run's logs); the terminal gets each record's message alone, and
nothing of the stages that never ran, unless `CATDOG_DEBUG=1` (or `--debug`) asks for
everything. The same holds in the worker processes of `--runner dask`, which print to the
run's terminal too (`dask_setup`).
"""

from __future__ import annotations

import logging
import os

DEBUG_ENV = "CATDOG_DEBUG"


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


class WithoutTraceback(logging.Formatter):
    """Formats a record as `formatter` does, leaving its traceback out."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.formatter = formatter

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info or record.exc_text or record.stack_info):
            return self.formatter.format(record)
        plain = logging.makeLogRecord(record.__dict__)
        plain.exc_info = plain.exc_text = plain.stack_info = None
        return self.formatter.format(plain)


def never_ran(record: logging.LogRecord) -> bool:
    """False for the record of a task that never ran because an upstream one failed."""
    return "Finished in state NotReady(" not in record.getMessage()


def quiet_tracebacks() -> None:
    """Keep tracebacks, and the stages that never ran, out of the terminal's log lines (not out
    of the API's), unless debugging."""
    if debugging():
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(
                handler.formatter, WithoutTraceback
            ):
                handler.setFormatter(WithoutTraceback(handler.formatter or logging.Formatter()))
                handler.addFilter(never_ran)


def dask_setup(worker: object) -> None:
    """Dask's preload hook, run as each worker of `--runner dask`'s local cluster starts: its
    log lines reach the run's terminal, so they follow the terminal's rule."""
    import prefect  # noqa: F401  (sets up Prefect's logging in this process)

    quiet_tracebacks()


def one_line(error: BaseException | None) -> str:
    """An error's message on one line, for the terminal and the UI."""
    return " ".join(str(error).split()) if error is not None else "no reason given"
