"""Cluster: the default models on workers that share nothing but an object store, against a
local folder, in one run of this script.

    python bench/cluster.py [--max-images-per-class 250] [--epochs 20]

An S3 server (SeaweedFS, as the tests start it) and a Prefect server on 127.0.0.1; the real
dataset's images uploaded to the store as a folder of class folders (`s3://catdog/real/`); a
Dask scheduler and two workers of one TensorFlow thread each, every worker in a mount namespace
of its own with an empty tmpfs over this benchmark's folder (it sees the store, the Prefect API,
the project and the weights, not the client's files). Each flow in its own process:

1. `local`: cold on a local folder, from the real archive, with one TensorFlow thread (as a
   worker has), the default (sequential) runner.
2. `cluster`: cold, `--data s3://catdog/real/ --artifacts s3://catdog/cluster --dask-address
   <scheduler>`, from an empty local cache: every stage on the workers.
3. `new machine`: the same command from another empty local cache.
4. `two at once`: two clients, each on a host of its own, the same command with the next seed
   (new splits and trainings), started together.

The targets: the cluster's histories identical to the local run's (same data, seed and thread
count), the new machine's run all `Cached` but the checks, the gate and the report, and the two
runs at once both complete with the registry's history whole and in order.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH,
    RawLog,
    add_from_json_argument,
    add_input_arguments,
    bf16_flags,
    catdog_env,
    command_line,
    environment_markdown,
    flow_script,
    fmt_gib,
    keep_logs,
    log,
    measure_catdog,
    now,
    ratio,
    resolve_inputs,
    snapshot_facts,
    snapshot_sources,
    table,
    verdict,
    write_section,
)
from bench.scale import real_images
from bench.soak import _wait_healthy, free_port
from tests.hosts import on_a_host_of_its_own

TITLE = "catdog benchmark results"
DATA_URL = "s3://catdog/real/"
ARTIFACTS_URL = "s3://catdog/cluster"
ONE_TF_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
BY_DESIGN = ("check_data", "promote_model", "write_report")  # uncached: checks, gate, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/cluster.py", description=__doc__.splitlines()[0]
    )
    add_input_arguments(parser)
    parser.add_argument("--max-images-per-class", type=int, default=250)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--section", default="cluster")
    parser.add_argument("--timeout", type=float, default=3600)
    add_from_json_argument(parser)
    return parser.parse_args(argv)


def _upload(s3: Any, root: Path, prefix: str) -> int:
    """Every image under `root` to `prefix/` in the bucket, under its relative path."""
    client = s3.client()
    paths = sorted(p for p in root.rglob("*.jpg"))

    def put(path: Path) -> None:
        client.upload_file(str(path), s3.bucket, f"{prefix}/{path.relative_to(root).as_posix()}")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(put, paths))
    return len(paths)


def flow_command(
    args: argparse.Namespace, source: Path, data: str, artifacts: str, *extra: str, seed: int
) -> list[str]:
    return [
        sys.executable,
        str(flow_script(source)),
        "--data",
        data,
        "--weights",
        str(args.weights),
        "--epochs",
        str(args.epochs),
        "--max-images-per-class",
        str(args.max_images_per_class),
        "--seed",
        str(seed),
        "--no-export",
        "--artifacts",
        artifacts,
        *extra,
    ]


def flow_run(
    args: argparse.Namespace,
    label: str,
    data: str,
    artifacts: str,
    copy: Path,
    env: dict[str, str],
    work: Path,
    source: Path,
    *extra: str,
) -> dict[str, Any]:
    command = flow_command(args, source, data, artifacts, *extra, seed=args.seed)
    log(f"{label}: {' '.join(command[1:])}")
    run, summary = measure_catdog(
        command, work / "logs" / f"{label}.log", copy, timeout=args.timeout, env=env
    )
    keep_logs(work, label)
    entry: dict[str, Any] = {"label": label, "run": run.to_json()}
    if summary:
        entry.update(
            tasks=summary["tasks"],
            histories={name: model["history"] for name, model in summary["models"].items()},
            workers={name: model.get("worker") for name, model in summary["models"].items()},
            images=summary["data"]["images"],
        )
    return entry


def two_at_once(
    args: argparse.Namespace, s3: Any, address: str, env: dict[str, str], work: Path, source: Path
) -> dict[str, Any]:
    """Two clients, each on a host of its own, start the same command (the next seed: new
    splits and trainings) at the same moment; what each ended with and what the store's
    registry recorded."""

    def registry() -> dict[str, Any]:
        key = f"{ARTIFACTS_URL.removeprefix(f's3://{s3.bucket}/')}/production/registry.json"
        body = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        return dict(json.loads(body))

    home = work / "host"
    before = registry()["history"]
    command = flow_command(
        args, source, DATA_URL, ARTIFACTS_URL, "--dask-address", address, seed=args.seed + 1
    )
    log(f"two at once: {' '.join(command[1:])}")
    started = time.monotonic()
    logs = [(work / "logs" / f"two-at-once-{i}.log").open("w") for i in range(2)]
    clients = [
        subprocess.Popen(
            on_a_host_of_its_own(command, work, home),
            env={**env, "CATDOG_CACHE_DIR": str(home / "cache"), "PREFECT_HOME": str(home)},
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        for handle in logs
    ]
    ended = []
    for client in clients:
        code = client.wait(timeout=args.timeout)
        ended.append({"returncode": code, "wall_seconds": time.monotonic() - started})
    for handle in logs:
        handle.close()
    after = registry()["history"]
    return {
        "label": "two at once",
        "clients": ended,
        "history_before": len(before),
        "kept_whole": after[: len(before)] == before,
        "decisions": [
            {"action": entry.get("action"), "run_id": entry.get("run_id")}
            for entry in after[len(before) :]
        ],
    }


def render(data: dict[str, Any]) -> str:
    runs = {entry["label"]: entry for entry in data["runs"]}
    lines = [
        f"## Cluster: two workers sharing only an S3 store, against a local folder "
        f"({data['started']})",
        "",
        environment_markdown({**data["environment"], "command": f"`{data['command']}`"}),
        "",
        f"The default models, {data['epochs']} epochs, `--no-export`, the real MobileNetV2 "
        f"weights, on the real dataset cut to {data['max_images_per_class']} images per class "
        "and split (`--max-images-per-class`). `local`: cold on a folder from the real archive, "
        "the sequential runner, one TensorFlow thread. `cluster`: the images uploaded to "
        f"SeaweedFS on 127.0.0.1 as a folder of class folders (`--data {DATA_URL}`), the "
        f"artifacts there too (`--artifacts {ARTIFACTS_URL}`), a Dask scheduler and two workers "
        "of one TensorFlow thread each, every worker in a mount namespace of its own with an "
        "empty tmpfs over the benchmark's folder, from an empty local cache (at the path the "
        "workers' caches have, as the README asks). `new machine`: the same command from an "
        "empty local cache again.",
        "",
    ]
    missing = [k for k in ("local", "cluster", "new machine") if "tasks" not in runs.get(k, {})]
    if missing:
        failed = {k: runs.get(k, {}).get("run", {}).get("error") for k in missing}
        return "\n".join([*lines, f"Runs without a summary: {failed}"])
    local, cluster, again = (runs[k] for k in ("local", "cluster", "new machine"))
    rows = [
        [
            label,
            f"{run['run']['wall_seconds']:.1f} s",
            fmt_gib(run["run"]["peak_bytes"]),
            f"{run['images']:,}",
            ", ".join(
                f"{name} {(worker or {}).get('pid', '?')}"
                for name, worker in sorted(run["workers"].items())
            ),
        ]
        for label, run in (("local", local), ("cluster", cluster), ("new machine", again))
    ]
    same = cluster["histories"] == local["histories"]
    differ = sorted(
        name
        for name, history in local["histories"].items()
        if cluster["histories"].get(name) != history
    )
    not_cached = sorted(t for t, s in again["tasks"].items() if s != "Cached")
    wall = ratio(cluster["run"]["wall_seconds"], local["run"]["wall_seconds"])
    checks = [
        [
            "the cluster's histories identical to the local run's",
            "identical, every model" if same else f"they differ: {', '.join(differ)}",
            verdict(same),
        ],
        [
            "new machine: all `Cached` but the checks, the gate and the report",
            f"{again['run']['wall_seconds']:.1f} s; not cached: {', '.join(not_cached)}",
            verdict(all(task.startswith(BY_DESIGN) for task in not_cached)),
        ],
    ]
    at_once = data.get("at_once")
    if at_once:
        codes = [client["returncode"] for client in at_once["clients"]]
        runs = {decision["run_id"] for decision in at_once["decisions"]}
        whole = at_once["kept_whole"] and len(at_once["decisions"]) == 2 and len(runs) == 2
        checks.append(
            [
                "two runs at once (the next seed), each client on a host of its own: both "
                "complete, the registry whole and in order",
                f"exit codes {codes}, in "
                + ", ".join(f"{client['wall_seconds']:.0f} s" for client in at_once["clients"])
                + f"; the {at_once['history_before']} earlier decisions "
                + ("kept" if at_once["kept_whole"] else "changed")
                + ", then "
                + ", ".join(decision["action"] for decision in at_once["decisions"])
                + f" by {len(runs)} runs",
                verdict(codes == [0, 0] and whole),
            ]
        )
    lines += [
        table(["run", "wall", "client's peak memory", "images", "trained by (pid)"], rows),
        "",
        f"The cluster's wall is {wall:.2f}x the local run's (two workers of one thread against "
        "one process of one thread; each worker's first look at the data fetches it from the "
        f"store). The data prefix held {data.get('uploaded', 0):,} images.",
        "",
        "### Targets",
        "",
        table(["target", "measured", "verdict"], checks),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from tests.s3_server import serving

    args = parse_args(argv)
    if args.from_json:
        write_section(args.out, args.section, render(json.loads(args.from_json.read_text())), TITLE)
        return 0
    resolve_inputs(args)
    work = (args.workdir or Path(tempfile.gettempdir()) / "catdog-cluster").resolve()
    for name in ("local", "seaweedfs", "prefect", "host"):
        shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    sources = Path(tempfile.mkdtemp(prefix="catdog-cluster-src-"))
    snapshot = snapshot_sources(sources / "now")
    source = Path(snapshot["path"])
    raw = RawLog(args.out.with_suffix(f".{args.section}.json"))
    raw.data.update(
        started=now(),
        epochs=args.epochs,
        max_images_per_class=args.max_images_per_class,
        command=command_line(),
        environment={**snapshot_facts(snapshot), "CPU flags": bf16_flags()},
        runs=[],
    )
    port = free_port()
    api = {
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    server_env = {**catdog_env(source, work / "prefect"), **api}
    processes: list[subprocess.Popen] = []
    try:
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--port", str(port)],
                env=server_env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        _wait_healthy(api["PREFECT_API_URL"])
        with serving(work / "seaweedfs", volume_size_mb=1024) as s3:
            images = real_images(args.data, work)
            prefix = DATA_URL.removeprefix(f"s3://{s3.bucket}/").rstrip("/")
            raw.data["uploaded"] = _upload(s3, images, prefix)
            address = f"tcp://127.0.0.1:{free_port()}"
            base = {**catdog_env(source, work / "prefect-client"), **api, **s3.env, **ONE_TF_THREAD}
            dask = [sys.executable, "-m", "dask"]
            scheduler_port = address.rsplit(":", 1)[1]
            scheduler = [*dask, "scheduler", "--host", "127.0.0.1", "--port", scheduler_port]
            processes.append(
                subprocess.Popen(
                    [*scheduler, "--no-dashboard"],
                    env={**base, "DASK_DISTRIBUTED__SCHEDULER__UNKNOWN_TASK_DURATION": "60s"},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            home = work / "host"
            for i in range(2):
                worker = [*dask, "worker", address, "--nthreads", "1", "--no-nanny",
                          "--no-dashboard", "--name", f"host-{i}"]  # fmt: skip
                worker_env = {**base, "CATDOG_CACHE_DIR": str(home / "cache"),
                              "PREFECT_HOME": str(home)}  # fmt: skip
                processes.append(
                    subprocess.Popen(
                        on_a_host_of_its_own(worker, work, home),
                        env=worker_env,
                        stdout=subprocess.DEVNULL,
                        stderr=(work / f"host-{i}.log").open("w"),
                    )
                )
            # The client's cache at the workers' path, as the README asks of every host
            # (Prefect's cache records name it); emptied before each run: a new client.
            cache = home / "cache"
            copy = cache / "stores/s3/catdog/cluster"
            plan = [
                ("local", str(args.data), str(work / "local"), work / "local", ()),
                ("cluster", DATA_URL, ARTIFACTS_URL, copy, ("--dask-address", address)),
                ("new machine", DATA_URL, ARTIFACTS_URL, copy, ("--dask-address", address)),
            ]
            for label, data, artifacts, summary_folder, extra in plan:
                env = dict(base)
                if artifacts == ARTIFACTS_URL:
                    shutil.rmtree(cache, ignore_errors=True)
                    env["CATDOG_CACHE_DIR"] = str(cache)
                entry = flow_run(
                    args, label, data, artifacts, summary_folder, env, work, source, *extra
                )
                raw.data["runs"].append(entry)
                raw.save()
            raw.data["at_once"] = two_at_once(args, s3, address, base, work, source)
            raw.save()
    finally:
        for process in reversed(processes):
            process.kill()
            process.wait()
    write_section(args.out, args.section, render(raw.data), TITLE)
    shutil.rmtree(sources, ignore_errors=True)
    os.sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
