"""How a local Dask cluster for catdog shares out one machine: how many worker processes, and
each one's part of it (CPU threads for TensorFlow, at most one GPU).

Plain Python with no Dask, Prefect or TensorFlow import: the flow lays out its cluster before
any of them would start.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from catdog.errors import CatdogError

DEFAULT_CPU_WORKERS = 2  # with no GPU: two models train side by side


class ClusterError(CatdogError):
    """A Dask option that cannot work: no workers, or no scheduler at the address given."""


@dataclass(frozen=True)
class WorkerShare:
    """One worker process's part of the machine."""

    name: str
    threads: int  # TensorFlow's intra- and inter-op threads
    gpu: str | None  # the one GPU it sees (a CUDA_VISIBLE_DEVICES entry), None for CPU only

    def env(self) -> dict[str, str]:
        """Environment variables that hold TensorFlow to this share, set before it starts."""
        threads = str(self.threads)
        return {
            "TF_NUM_INTRAOP_THREADS": threads,
            "TF_NUM_INTEROP_THREADS": threads,
            "OMP_NUM_THREADS": threads,
            # TensorFlow takes every GPU it sees: a worker must see only its own, or none.
            "CUDA_VISIBLE_DEVICES": self.gpu or "",
        }

    @property
    def resources(self) -> dict[str, float]:
        """Dask resources: a GPU worker takes one GPU task at a time."""
        return {"GPU": 1} if self.gpu is not None else {}


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries.

    Asks `nvidia-smi` (importing TensorFlow to ask would take seconds, and the flow's own
    process trains nothing on the Dask runner); CUDA_VISIBLE_DEVICES narrows the list as it
    would for TensorFlow.
    """
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip() not in ("", "-1")]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        output = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in output.splitlines() if line.strip()]


def plan_workers(workers: int | None, cpu_count: int, gpus: list[str]) -> list[WorkerShare]:
    """Split a machine of `cpu_count` cores and `gpus` into worker shares.

    Args:
        workers: How many worker processes; None for one per GPU, or two without a GPU.
        cpu_count: Cores to share out; each worker gets an equal part, at least one.
        gpus: Visible GPUs; worker i gets gpus[i], workers beyond them get none.

    Raises:
        ClusterError: `workers` is less than one.
    """
    if workers is None:
        workers = len(gpus) or DEFAULT_CPU_WORKERS
    if workers < 1:
        raise ClusterError(f"--workers {workers}: a cluster needs at least one worker")
    threads = max(1, cpu_count // workers)
    return [
        WorkerShare(f"catdog-{i}", threads, gpus[i] if i < len(gpus) else None)
        for i in range(workers)
    ]


def check_scheduler_address(address: str, timeout: float = 5.0) -> str:
    """`address` as Dask takes it, once something answers there.

    Accepts `tls://HOST:PORT`, `tcp://HOST:PORT` or `HOST:PORT` (plain TCP).

    Raises:
        ClusterError: The address is malformed, or nothing accepts a connection there.
    """
    url = address if "://" in address else f"tcp://{address}"
    scheme, _, rest = url.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme not in ("tcp", "tls") or not host or not port.isdigit():
        raise ClusterError(
            f"--dask-address {address!r}: expected tls://HOST:PORT (or tcp://HOST:PORT)"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ClusterError(
            f"--dask-address {address}: no Dask scheduler answers there ({reason}); "
            "start one with `dask scheduler` or drop the option"
        ) from None
    return url
