"""Locks between hosts that share an object store: catdog's leases in the store against
Prefect's `RedisLockManager` on a Redis server, on 127.0.0.1 both.

    .venv/bin/python bench/studies/store_locks.py [--rounds 50] [--redis-lib DIR]

For each lock manager: the seconds of an uncontended acquire and release (what every computed
stage pays), and the handover: how long a waiter takes to get the lock after its holder
releases it (what a host waiting for another's entry pays once). The leases run against
SeaweedFS (tests/s3_server.py); Redis needs `redis-server` on the PATH and the `prefect-redis`
package, which catdog does not depend on: install it apart (`pip install --target DIR
prefect-redis redis`) and give `--redis-lib DIR`. Writes section `store-locks` of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import (
    BENCH,
    bf16_flags,
    command_line,
    environment_markdown,
    log,
    table,
    write_section,
)

TITLE = "catdog benchmark results"


def _seconds(manager: Any, other: Any, rounds: int) -> tuple[list[float], list[float]]:
    """Uncontended acquire + release, and handovers from `manager` to `other` (another
    host's), each `rounds` times."""
    uncontended = []
    for round_ in range(rounds):
        started = time.perf_counter()
        assert manager.acquire_lock(f"solo-{round_}", "holder", acquire_timeout=30)
        manager.release_lock(f"solo-{round_}", "holder")
        uncontended.append(time.perf_counter() - started)
    handovers = []
    for round_ in range(rounds):
        key = f"turn-{round_}"
        assert manager.acquire_lock(key, "first", acquire_timeout=30)
        got: dict[str, float] = {}

        def wait(key: str = key, got: dict[str, float] = got) -> None:
            assert other.acquire_lock(key, "second", acquire_timeout=30)
            got["at"] = time.perf_counter()
            other.release_lock(key, "second")

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.3)  # the waiter is waiting
        released = time.perf_counter()
        manager.release_lock(key, "first")
        waiter.join()
        handovers.append(got["at"] - released)
    return uncontended, handovers


def _store_managers(workdir: Path) -> tuple[Any, Any, Callable[[], None]]:
    from tasks.locks import StoreLockManager
    from tests.s3_server import serving

    server = serving(workdir / "seaweedfs")
    s3 = server.__enter__()
    os.environ.update(s3.env)
    os.environ["CATDOG_CACHE_DIR"] = str(workdir / "cache")
    url = f"s3://{s3.bucket}/locks-study"
    # Two hosts: each its own lock files; the lease in the store is what they share.
    managers = [StoreLockManager(workdir / f"host-{i}" / "locks", url) for i in range(2)]
    return *managers, lambda: server.__exit__(None, None, None)


def _redis_managers(workdir: Path, lib: Path) -> tuple[Any, Any, Callable[[], None]]:
    sys.path.insert(0, str(lib))
    from prefect_redis.locking import RedisLockManager

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)

    def stop() -> None:
        process.terminate()
        process.wait()

    managers = [RedisLockManager(host="127.0.0.1", port=port) for _ in range(2)]
    return *managers, stop


def _row(name: str, uncontended: list[float], handovers: list[float]) -> list[str]:
    def ms(values: list[float], q: float) -> str:
        return f"{1000 * statistics.quantiles(values, n=100)[int(q) - 1]:.1f} ms"

    return [
        name,
        f"{1000 * statistics.median(uncontended):.1f} ms",
        ms(uncontended, 95),
        f"{1000 * statistics.median(handovers):.0f} ms",
        ms(handovers, 95),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--redis-lib", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="catdog-locks-"))
    rows = []
    try:
        candidates: list[tuple[str, Callable[[], tuple[Any, Any, Callable[[], None]]]]] = [
            ("catdog leases (SeaweedFS)", lambda: _store_managers(workdir))
        ]
        if args.redis_lib and shutil.which("redis-server"):
            candidates.append(
                (
                    "RedisLockManager (redis-server)",
                    lambda: _redis_managers(workdir, args.redis_lib),
                )
            )
        for name, start in candidates:
            log(f"{name}: {args.rounds} rounds")
            manager, other, stop = start()
            try:
                rows.append(_row(name, *_seconds(manager, other, args.rounds)))
            finally:
                stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    body = "\n".join(
        [
            "## Locks between hosts: leases in the store against Redis",
            "",
            environment_markdown({"CPU flags": bf16_flags(), "command": f"`{command_line()}`"}),
            "",
            f"{args.rounds} rounds each, client and server on 127.0.0.1. *Lock and release*: "
            "an uncontended acquire and release, what each computed stage pays. *Handover*: "
            "from the holder's release to the waiter holding the lock, what a host waiting "
            "for another's entry pays once (catdog's waiter looks at the lease every 0.5 s).",
            "",
            table(
                ["lock manager", "lock and release (median)", "p95", "handover (median)", "p95"],
                rows,
            ),
        ]
    )
    write_section(args.out, "store-locks", body, TITLE)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
