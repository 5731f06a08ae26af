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
from prefect.logging import get_logger
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from catdog.cluster import (
    ClusterError,
    WorkerShare,
    check_scheduler_address,
    plan_workers,
    visible_gpus,
)
from flows.console import one_line

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
        security = cluster_security(address)
        check_lasting_api(dask_address)
        check_client(address, security)
        return DaskTaskRunner(address=address, client_kwargs={"security": security})
    from distributed import Security

    shares = plan_workers(workers, os.cpu_count() or 1, visible_gpus())
    # Credentials that exist only in this process and the workers it starts: nobody else on
    # the machine can send the scheduler work while the run lasts.
    security = Security.temporary()
    return DaskTaskRunner(
        cluster_class=local_cluster,
        cluster_kwargs={
            "shares": shares,
            "memory_limit": memory_bytes() // len(shares),
            "security": security,
        },
        client_kwargs={"security": security},
    )


TLS_SETTINGS = (
    "DASK_DISTRIBUTED__COMM__TLS__CA_FILE, DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT and "
    "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"
)


def cluster_security(address: str) -> Any:
    """The client's side of the cluster's security, from Dask's own settings (the
    `distributed.comm.tls.*` and `distributed.comm.require-encryption` configuration, or their
    DASK_DISTRIBUTED__COMM__... environment variables), checked against the address's scheme.

    Raises:
        ClusterError: A tls:// address without a CA, certificate and key; or a tcp:// address
            where TLS is configured or encryption is required.
    """
    from distributed import Security

    security = Security()
    credentials = [security.tls_ca_file, security.tls_client_cert, security.tls_client_key]
    if address.startswith("tls://") and not all(credentials):
        raise ClusterError(
            f"--dask-address {address}: a TLS scheduler needs this client's CA file, "
            f"certificate and key: set {TLS_SETTINGS} (see README, Scaling out)"
        )
    if address.startswith("tcp://") and (security.require_encryption or any(credentials)):
        raise ClusterError(
            f"--dask-address {address}: Dask's TLS settings are set (or encryption is "
            "required) but the address is plain TCP: use tls://"
        )
    return security


def check_client(address: str, security: Any, timeout: float = 10.0) -> None:
    """Connect to the scheduler once, as the run will, so that refused credentials stop the
    run before any work.

    Raises:
        ClusterError: No connection within `timeout` seconds (a certificate the scheduler does
            not trust, or one this client does not trust, shows as that).
    """
    from distributed import Client

    try:
        with Client(address, security=security, timeout=timeout, set_as_default=False):
            pass
    except (OSError, TimeoutError) as error:
        hint = (
            " (its TLS certificates: is each signed by the CA the other trusts?)"
            if address.startswith("tls://")
            else " (a scheduler that takes TLS needs a tls:// address)"
        )
        raise ClusterError(
            f"--dask-address {address}: could not connect to the scheduler{hint}: {one_line(error)}"
        ) from None


def check_lasting_api(dask_address: str) -> str:
    """The Prefect API that a running cluster's workers report to, once it answers.

    The workers of a cluster outlive a run; Prefect's clients in them keep talking to the API
    they first met. A temporary API server, started for one run and gone with it, would leave
    them talking to nothing on the next run: the API must be a `prefect server start` (or
    Prefect Cloud) that PREFECT_API_URL names.

    Raises:
        ClusterError: PREFECT_API_URL is not set, or nothing answers there.
    """
    from prefect import get_client
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
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()  # with this client's credentials, Cloud's too
    if problem is not None:
        raise ClusterError(
            f"--dask-address {dask_address}: the Prefect API at {url} does not answer "
            f"({type(problem).__name__}); {start}"
        ) from None
    return str(url)


def check_api_access() -> None:
    """Ask the configured Prefect API for something only an authorised client may read.

    Raises:
        ClusterError: The API refuses this client: its PREFECT_API_AUTH_STRING is missing or
            not the server's PREFECT_SERVER_API_AUTH_STRING.
    """
    import httpx
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # Prefect's own temporary server: nobody else's to refuse
        return
    try:
        with get_client(sync_client=True) as client:
            client.hello()
    except httpx.HTTPStatusError as error:
        if error.response.status_code not in (401, 403):
            raise
        raise ClusterError(
            f"the Prefect API at {PREFECT_API_URL.value()} refused this client "
            f"(HTTP {error.response.status_code}): set PREFECT_API_AUTH_STRING to the server's "
            "PREFECT_SERVER_API_AUTH_STRING"
        ) from None


def local_cluster(shares: list[WorkerShare], memory_limit: int, security: Any) -> Any:
    """A Dask cluster on this machine: a scheduler on loopback and one worker process per share,
    all speaking TLS with `security`'s credentials (no dashboard).

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
                "security": security,
                "protocol": "tls://",
                # The workers print to the run's terminal: one line per failure there too.
                "preload": ["flows.console"],
            },
        }
        for share in shares
    }
    scheduler = {
        "cls": Scheduler,
        "options": {
            "host": "127.0.0.1",
            "dashboard": False,
            "security": security,
            "protocol": "tls://",
        },
    }
    # Dask's start-up and shutdown chatter would bury the run's own log lines: quiet here,
    # and in the worker processes, which read Dask's settings from the environment they inherit.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    # prefect-dask announces a dashboard whenever Dask has a link for one; this cluster has none.
    log = get_logger("task_runner.dask")
    log.addFilter(lambda record: "dashboard" not in record.getMessage())
    cluster = SpecCluster(workers=workers, scheduler=scheduler, security=security)
    log.info(
        "Dask scheduler of this run at %s (TLS; only this run and its %d workers hold the "
        "credentials)",
        cluster.scheduler_address,
        len(shares),
    )
    return cluster


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
