"""A run's long-lived objects, kept out of the cyclic garbage collector's way.

A run's process holds objects that live as long as the run does: Prefect's engine and its
local API server, TensorFlow and Keras (about 300,000 objects on import), the models. CPython's
collector walks every one of them at each full collection, which a stage that builds a manifest
of 30,000 entries triggers a few times: 0.1 to 0.3 s each on a 2-core machine, about 20 times in
an incremental run whose own work takes a minute, and 1.4 s of an 8 s unchanged rerun.

`gc.freeze` moves the objects alive at one moment out of every later collection. Inside
`run_heap`, `settle` collects what is garbage and freezes what survives, so each collection
after it walks only what was made since; at the end of the run everything frozen is handed back
to the collector, so whatever died in between is collected as usual. Only the process that runs
the flow does this: a worker of a cluster, which serves many runs, never freezes anything.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_runs = 0  # runs of this process inside `run_heap` now


@contextmanager
def run_heap() -> Iterator[None]:
    """For the duration of one run, let `settle` freeze the objects that outlive its stages."""
    global _runs
    with _lock:
        _runs += 1
    settle()
    try:
        yield
    finally:
        with _lock:
            _runs -= 1
            if _runs == 0:
                gc.unfreeze()


def settle() -> None:
    """Inside `run_heap`: collect what is garbage now, then freeze what is alive (it costs what
    was made since the last call). Elsewhere nothing."""
    if _runs:
        gc.collect()
        gc.freeze()


def frozen() -> int:
    """How many objects are frozen now."""
    return gc.get_freeze_count()
