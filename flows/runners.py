"""Where the flow's tasks run: one after another in the flow's process (the default), on a
temporary Dask cluster of this machine (`--runner dask`), or on a running Dask cluster
(`--dask-address`).

Dask is imported only when a Dask runner is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, Literal

from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from catdog.cluster import (
    ClusterError,
    WorkerShare,
    check_scheduler_address,
    plan_workers,
    visible_gpus,
)

Runner = Literal["sequential", "dask"]
RUNNERS: tuple[Runner, ...] = ("sequential", "dask")


def sequential() -> TaskRunner:
    """One task at a time, in submission order, in the flow's own process.

    Training seeds TensorFlow's global random state: two trainings in threads of one process
    would draw from it in turn and neither would be reproducible.
    """
    return ThreadPoolTaskRunner(max_workers=1)


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def task_runner(runner: Runner, workers: int | None, dask_address: str | None) -> TaskRunner:
    """The task runner the command line asks for; fails before any work if it cannot work.

    Raises:
        ClusterError: `workers` below one, no scheduler answers at `dask_address`, or no
            Prefect server that outlives the run is configured for its workers.
    """
    if not dask_address and runner == "sequential":
        return sequential()
    from prefect_dask import DaskTaskRunner

    if dask_address:
        address = check_scheduler_address(dask_address)
        check_lasting_api(dask_address)
        return DaskTaskRunner(address=address)
    shares = plan_workers(workers, os.cpu_count() or 1, visible_gpus())
    return DaskTaskRunner(
        cluster_class=local_cluster,
        cluster_kwargs={"shares": shares, "memory_limit": memory_bytes() // len(shares)},
    )


def check_lasting_api(dask_address: str, timeout: float = 5.0) -> str:
    """The Prefect API that a running cluster's workers report to, once it answers.

    The workers of a cluster outlive a run; Prefect's clients in them keep talking to the API
    they first met. A temporary API server, started for one run and gone with it, would leave
    them talking to nothing on the next run: the API must be a `prefect server start` (or
    Prefect Cloud) that PREFECT_API_URL names.

    Raises:
        ClusterError: PREFECT_API_URL is not set, or nothing answers there.
    """
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    start = (
        "start one with `prefect server start` and set PREFECT_API_URL, e.g. "
        "PREFECT_API_URL=http://127.0.0.1:4200/api (see README, Scaling out)"
    )
    if not url:
        raise ClusterError(
            f"--dask-address {dask_address}: the cluster's workers need a Prefect server that "
            f"outlives this run; {start}"
        )
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=timeout).raise_for_status()
    except httpx.HTTPError as error:
        raise ClusterError(
            f"--dask-address {dask_address}: the Prefect API at {url} does not answer "
            f"({type(error).__name__}); {start}"
        ) from None
    return str(url)


def local_cluster(shares: list[WorkerShare], memory_limit: int) -> Any:
    """A Dask cluster on this machine: a scheduler on loopback and one worker process per share.

    Each worker runs one task at a time and holds TensorFlow to its share of the cores (and to
    its one GPU) through the environment it starts with.
    """
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {
        share.name: {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "env": share.env(),
                "resources": share.resources,
                "memory_limit": memory_limit,
                "host": "127.0.0.1",
                "dashboard": False,
            },
        }
        for share in shares
    }
    scheduler = {
        "cls": Scheduler,
        "options": {"host": "127.0.0.1", "dashboard": False},
    }
    # Dask's start-up and shutdown chatter would bury the run's own log lines: quiet here,
    # and in the worker processes, which read Dask's settings from the environment they inherit.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    return SpecCluster(workers=workers, scheduler=scheduler)


def _gpu_workers() -> bool:
    """True when the flow runs on a Dask cluster with a worker that offers a GPU resource."""
    context = FlowRunContext.get()
    if context is None or "prefect_dask" not in sys.modules:
        return False
    from prefect_dask import DaskTaskRunner

    if not isinstance(context.task_runner, DaskTaskRunner):
        return False
    workers = context.task_runner.client.scheduler_info().get("workers", {})
    return any(worker.get("resources", {}).get("GPU") for worker in workers.values())


@contextlib.contextmanager
def on_a_gpu(wanted: bool) -> Iterator[None]:
    """Tasks submitted inside go to workers with a GPU, one at a time each, when the cluster
    has such workers; otherwise anywhere (a requirement no worker meets would wait forever)."""
    if not (wanted and _gpu_workers()):
        yield
        return
    import dask

    with dask.annotate(resources={"GPU": 1}):
        yield
