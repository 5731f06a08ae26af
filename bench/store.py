"""Store: what `--artifacts s3://...` costs against a local folder, in one run of this script.

    python bench/store.py [--factor 1] [--epochs 20] [--section store]

An S3 server (SeaweedFS, as the tests start it) on 127.0.0.1; the real dataset (enlarged
`--factor` times with bench/scale.py's variants when above 1); the default models. Each flow in
its own process, one after the other:

1. `local`: cold, on a local artifacts folder.
2. `store`: cold, on `s3://catdog/bench` with an empty local cache (CATDOG_CACHE_DIR).
3. `new machine`: the same store again, from another empty local cache: what a second machine
   pays for a run that is all `Cached`, and the bytes it fetched (its cache after the run:
   every stage output it downloaded, plus its own report).

The targets: the cold store run at most 1.10x the local one, the same histories (same seed,
same machine), and peak memory within 10% of the local run's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
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
    fmt,
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
from bench.scale import enlarged, real_images
from catdog.layout import size_on_disk

TITLE = "catdog benchmark results"
URL = "s3://catdog/bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/store.py", description=__doc__.splitlines()[0]
    )
    add_input_arguments(parser)
    parser.add_argument("--factor", type=int, default=1, help="dataset size, times the real one")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--section", default="store")
    parser.add_argument("--timeout", type=float, default=3 * 3600)
    add_from_json_argument(parser)
    return parser.parse_args(argv)


def flow_run(
    args: argparse.Namespace,
    label: str,
    data: Path,
    artifacts: str,
    copy: Path,
    env: dict[str, str],
    work: Path,
    source: Path,
) -> dict[str, Any]:
    """One flow run, measured; `copy` is where its summary.json is read (the local folder, or
    the host's copy of the store)."""
    command = [
        sys.executable,
        str(flow_script(source)),
        "--data",
        str(data),
        "--weights",
        str(args.weights),
        "--epochs",
        str(args.epochs),
        "--seed",
        str(args.seed),
        "--no-export",
        "--artifacts",
        artifacts,
    ]
    log(f"{label}: {' '.join(command[1:])}")
    run, summary = measure_catdog(
        command, work / "logs" / f"{label}.log", copy, timeout=args.timeout, env=env
    )
    keep_logs(work, label)
    entry: dict[str, Any] = {"label": label, "run": run.to_json()}
    if summary:
        entry.update(
            tasks=summary["tasks"],
            stage_seconds=summary.get("stage_seconds", {}),
            histories={name: model["history"] for name, model in summary["models"].items()},
            cache_bytes=size_on_disk(copy),
        )
    return entry


def render(data: dict[str, Any]) -> str:
    runs = {entry["label"]: entry for entry in data["runs"]}
    lines = [
        f"## Store: artifacts on S3 (SeaweedFS on 127.0.0.1) against a local folder, "
        f"{data['factor']}x data ({data['started']})",
        "",
        environment_markdown({**data["environment"], "command": f"`{data['command']}`"}),
        "",
        f"The default models, {data['epochs']} epochs, `--no-export`, on the real dataset"
        + (f" enlarged {data['factor']}x" if data["factor"] > 1 else "")
        + ". Each run in its own process, one after the other: `local` cold on a folder, "
        "`store` cold on the store from an empty local cache, `new machine` the same store "
        "from another empty local cache.",
        "",
    ]
    missing = [k for k in ("local", "store", "new machine") if "tasks" not in runs.get(k, {})]
    if missing:
        failed = {k: runs.get(k, {}).get("run", {}).get("error") for k in missing}
        return "\n".join([*lines, f"Runs without a summary: {failed}"])
    local, store, again = (runs[k] for k in ("local", "store", "new machine"))
    rows = [
        [
            label,
            f"{run['run']['wall_seconds']:.1f} s",
            fmt_gib(run["run"]["peak_bytes"]),
            f"{run['cache_bytes'] / 2**20:,.1f} MiB",
            fmt(run["run"].get("others_cores"), 2),
        ]
        for label, run in (("local", local), ("store", store), ("new machine", again))
    ]
    stage_rows = [
        [
            stage,
            fmt(seconds, 1, " s"),
            fmt(store["stage_seconds"].get(stage), 1, " s"),
            f"{fmt(ratio(store['stage_seconds'].get(stage), seconds), 2)}x",
        ]
        for stage, seconds in local["stage_seconds"].items()
    ]
    wall = ratio(store["run"]["wall_seconds"], local["run"]["wall_seconds"])
    memory = ratio(store["run"]["peak_bytes"], local["run"]["peak_bytes"])
    not_cached = sorted(t for t, s in again["tasks"].items() if s != "Cached")
    by_design = ("check_data", "promote_model", "write_report")
    checks = [
        [
            "cold through the store ≤ 1.10x the local folder",
            f"{store['run']['wall_seconds']:.1f} s / {local['run']['wall_seconds']:.1f} s "
            f"= {fmt(wall, 3)}x",
            verdict(wall is not None and wall <= 1.10),
        ],
        [
            "the same histories (same seed, same machine)",
            "identical" if store["histories"] == local["histories"] else "they differ",
            verdict(store["histories"] == local["histories"]),
        ],
        [
            "peak memory within 10% of the local run's",
            f"{fmt_gib(store['run']['peak_bytes'])} against "
            f"{fmt_gib(local['run']['peak_bytes'])} ({fmt(memory, 3)}x)",
            verdict(memory is not None and memory <= 1.10),
        ],
        [
            "new machine: all `Cached` but the checks, the gate and the report",
            f"{again['run']['wall_seconds']:.1f} s, {again['cache_bytes'] / 2**20:,.1f} MiB "
            f"fetched; not cached: {', '.join(not_cached)}",
            verdict(all(task.startswith(by_design) for task in not_cached)),
        ],
    ]
    lines += [
        table(["run", "wall", "peak memory", "local copy after the run", "others' cores"], rows),
        "",
        table(["stage", "local", "store", "store / local"], stage_rows),
        "",
        f"The store held {data.get('store_bytes', 0) / 2**20:,.1f} MiB in "
        f"{data.get('store_objects', 0):,} objects after the runs.",
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
    work = args.workdir or Path(tempfile.gettempdir()) / "catdog-store"
    for name in ("local", "cache-store", "cache-new-machine", "seaweedfs"):
        shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    sources = Path(tempfile.mkdtemp(prefix="catdog-store-src-"))
    snapshot = snapshot_sources(sources / "now")
    source = Path(snapshot["path"])  # the code as it was when the benchmark started
    data = args.data
    if args.factor > 1:
        log(f"building the {args.factor}x dataset")
        data = enlarged(real_images(args.data, work), args.factor, work)
    raw = RawLog(args.out.with_suffix(f".{args.section}.json"))
    raw.data.update(
        started=now(),
        factor=args.factor,
        epochs=args.epochs,
        command=command_line(),
        environment={**snapshot_facts(snapshot), "CPU flags": bf16_flags()},
        runs=[],
    )
    with serving(work / "seaweedfs", volume_size_mb=1024) as s3:
        copy = Path("stores/s3/catdog/bench")  # a host's copy of URL, in its cache
        store, again = work / "cache-store", work / "cache-new-machine"
        plan = [
            ("local", str(work / "local"), work / "local", None),
            ("store", URL, store / copy, store),
            ("new machine", URL, again / copy, again),
        ]
        for label, artifacts, summary_folder, cache in plan:
            env = catdog_env(source, work / f"prefect-{label.replace(' ', '-')}")
            if cache is not None:
                env.update(s3.env, CATDOG_CACHE_DIR=str(cache))
            entry = flow_run(args, label, data, artifacts, summary_folder, env, work, source)
            raw.data["runs"].append(entry)
            raw.save()
        listing = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket)
        sizes = [item["Size"] for page in listing for item in page.get("Contents", [])]
        raw.data.update(store_bytes=sum(sizes), store_objects=len(sizes))
        raw.save()
    write_section(args.out, args.section, render(raw.data), TITLE)
    shutil.rmtree(sources, ignore_errors=True)
    os.sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
