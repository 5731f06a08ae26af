"""Increment: what a run costs after 5% new images, on the real dataset enlarged 10x.

    python bench/increment.py [--factor 10] [--share 0.05] [--baseline f8e049c]

The dataset is the real one enlarged `--factor` times (bench/scale.py's deterministic
variants), as a folder source. One image in 1/share (every 20th, in path order) is held back.
In one run of this script, each flow in its own process on the same artifacts:

1. `baseline`: the code of git `--baseline` (before per-image pieces), cold on the folder
   without the held-back images, on artifacts of its own: the cold seconds and peak memory
   "as before".
2. `cold`: this checkout's code, cold on the same folder.
3. `increment`: the held-back images added (hard links: new files for the folder source),
   the same command again.
4. `unchanged`: the same command once more, nothing changed.

`--models model4` at the default 20 epochs: the pixels at 224x224, the frozen base's
features, and a head on them; every per-image stage runs (manifest, inspection, decode,
features). The targets: each stage but training at most 10% of its cold seconds in the
increment, model4 (features and head) at most 15% of its cold seconds, peak memory within 10%
of the baseline's, and the unchanged rerun all `Cached`.
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
    snapshot_revision,
    snapshot_sources,
    table,
    verdict,
    write_section,
)
from bench.scale import enlarged, real_images

TITLE = "catdog benchmark results"
MODELS = "model4"
TRAINING = ("train_model[model4]",)  # its seconds are training, judged with the features
MODEL4 = ("extract_features[model4]", "train_model[model4]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/increment.py", description=__doc__.splitlines()[0]
    )
    add_input_arguments(parser)
    parser.add_argument("--factor", type=int, default=10, help="dataset size, times the real one")
    parser.add_argument("--share", type=float, default=0.05, help="share of images held back")
    parser.add_argument("--baseline", default="f8e049c", help="git revision before the change")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--workdir", type=Path, default=None, help="kept between runs")
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--section", default="increment")
    parser.add_argument("--timeout", type=float, default=3 * 3600)
    add_from_json_argument(parser)
    return parser.parse_args(argv)


def split_folder(full: Path, work: Path, share: float) -> tuple[Path, list[Path]]:
    """A folder of hard links to `full` without every 1/share-th image (in path order), and
    the held-back images' paths relative to it."""
    every = round(1 / share)
    images = sorted(p.relative_to(full) for p in full.rglob("*.jpg"))
    held = images[every - 1 :: every]
    base = work / "growing"
    shutil.rmtree(base, ignore_errors=True)
    skip = set(held)
    for relative in images:
        if relative not in skip:
            (base / relative).parent.mkdir(parents=True, exist_ok=True)
            (base / relative).hardlink_to(full / relative)
    return base, held


def flow_run(
    args: argparse.Namespace, label: str, data: Path, artifacts: Path, source: Path, work: Path
) -> dict[str, Any]:
    command = [
        sys.executable,
        str(flow_script(source)),
        "--data",
        str(data),
        "--weights",
        str(args.weights),
        "--models",
        MODELS,
        "--seed",
        str(args.seed),
        "--no-export",
        "--artifacts",
        str(artifacts),
    ]
    # One Prefect home for this checkout's runs, as a user's runs on one machine share theirs:
    # a home of its own made the unchanged rerun pay for creating Prefect's database (7 s
    # of its 20 on an AMD EPYC).
    env = catdog_env(source, work / ("prefect-baseline" if label == "baseline" else "prefect"))
    log(f"{label}: {' '.join(command[1:])}")
    run, summary = measure_catdog(
        command, work / "logs" / f"{label}.log", artifacts, timeout=args.timeout, env=env
    )
    keep_logs(work, label)
    entry: dict[str, Any] = {"label": label, "run": run.to_json()}
    if summary:
        entry.update(
            images=summary["data"]["images"],
            tasks=summary["tasks"],
            stage_seconds=summary.get("stage_seconds", {}),
            increment=summary.get("increment", {}),
            production_computed=((summary.get("promotion") or {}).get("evidence") or {}).get(
                "production_computed"
            ),
            test_images=sum(summary["data"]["counts"]["test"].values()),
            val_accuracy=summary["models"]["model4"]["history"]["val_accuracy"][-1],
            test_accuracy=summary["models"]["model4"]["test_accuracy"],
        )
    return entry


def render(data: dict[str, Any]) -> str:
    runs = {entry["label"]: entry for entry in data["runs"]}
    lines = [
        f"## Increment: 5% new images on the real data at {data['factor']}x ({data['started']})",
        "",
        environment_markdown({**data["environment"], "command": f"`{data['command']}`"}),
        "",
        f"`--models {MODELS}` (20 epochs, `--no-export`) on a folder of "
        f"{data['images_before']:,} images (the real dataset enlarged {data['factor']}x with "
        f"bench/scale.py's variants, every {round(1 / data['share'])}th image held back), then "
        f"with the {data['held_back']:,} held-back images added, then once more unchanged; "
        f"each run in its own process on the same artifacts and Prefect home (its database "
        "made by the cold run). `baseline` is git "
        f"{data['baseline']} (before per-image pieces), cold on the same folder. Stage seconds "
        "are the stages' own (summary.json `stage_seconds`; a `Cached` stage counts 0 s).",
        "",
    ]
    missing = [
        label
        for label in ("baseline", "cold", "increment", "unchanged")
        if "stage_seconds" not in runs.get(label, {})
    ]
    if missing:
        failed = {label: runs.get(label, {}).get("run", {}).get("error") for label in missing}
        return "\n".join([*lines, f"Runs without a summary: {failed}"])
    base, cold, inc, same = (runs[k] for k in ("baseline", "cold", "increment", "unchanged"))
    stages = list(cold["stage_seconds"])
    computed = inc["increment"].get("stages", {})
    rows, checks = [], []
    for stage in stages:
        before = base["stage_seconds"].get(stage)
        first = cold["stage_seconds"].get(stage)
        then = own_seconds(inc, stage)
        share = ratio(then, first)
        done = computed.get(stage)
        if stage.startswith("promote_model") and inc.get("production_computed") is not None:
            # The gate: production's predictions on the test images it had not scored.
            scored = inc["production_computed"]
            done = {"computed": scored, "reused": inc["test_images"] - scored}
        rows.append(
            [
                stage,
                fmt(before, 1, " s"),
                fmt(first, 1, " s"),
                fmt(then, 1, " s"),
                f"{fmt(share, 3)}x",
                f"{done['computed']:,} / {done['reused']:,}" if done else "",
            ]
        )
        if stage not in TRAINING and stage not in MODEL4 and (first or 0.0) < 1.0:
            checks.append([f"{stage}: increment ≤ 0.10x cold", "under 1 s cold", "n/a"])
        elif stage not in TRAINING and stage not in MODEL4:
            checks.append(
                [
                    f"{stage}: increment ≤ 0.10x cold",
                    f"{fmt(share, 3)}x",
                    verdict(share is not None and share <= 0.10),
                ]
            )
    model4_cold = sum(cold["stage_seconds"].get(s, 0.0) for s in MODEL4)
    model4_inc = sum(own_seconds(inc, s) for s in MODEL4)
    model4_share = ratio(model4_inc, model4_cold)
    checks.append(
        [
            "model4 (features and head): increment ≤ 0.15x cold",
            f"{model4_inc:.1f} s / {model4_cold:.1f} s = {fmt(model4_share, 3)}x",
            verdict(model4_share is not None and model4_share <= 0.15),
        ]
    )
    memory = ratio(cold["run"]["peak_bytes"], base["run"]["peak_bytes"])
    inc_memory = ratio(inc["run"]["peak_bytes"], base["run"]["peak_bytes"])
    checks.append(
        [
            "peak memory within 10% of the baseline's (cold, increment)",
            f"{fmt_gib(cold['run']['peak_bytes'])}, {fmt_gib(inc['run']['peak_bytes'])} "
            f"against {fmt_gib(base['run']['peak_bytes'])} ({fmt(memory, 3)}x, "
            f"{fmt(inc_memory, 3)}x)",
            verdict(
                memory is not None and inc_memory is not None and max(memory, inc_memory) <= 1.10
            ),
        ]
    )
    not_cached = sorted(t for t, state in same["tasks"].items() if state != "Cached")
    checks.append(
        [
            "unchanged rerun: every cached stage `Cached`",
            f"{same['run']['wall_seconds']:.1f} s; not cached: {', '.join(not_cached)} "
            "(uncached by design: checks, gate, report)",
            verdict(all(cached_by_design(task) for task in not_cached)),
        ]
    )
    walls = []
    for label in ("baseline", "cold", "increment", "unchanged"):
        run = runs[label]
        walls.append(
            [
                label,
                f"{run['run']['wall_seconds']:.0f} s",
                fmt_gib(run["run"]["peak_bytes"]),
                f"{100 * run['val_accuracy']:.1f}%",
                f"{100 * run['test_accuracy']:.1f}%",
                fmt(run["run"].get("others_cores"), 2),
            ]
        )
    images = inc["increment"].get("images") or {}
    lines += [
        table(
            [
                "run",
                "wall",
                "peak memory",
                "model4 val acc",
                "model4 test acc",
                "other processes' cores",
            ],
            walls,
        ),
        "",
        f"The increment's data: {images.get('new', '?'):,} new, {images.get('changed', '?')} "
        f"changed, {images.get('moved', '?')} moved, {images.get('removed', '?')} removed images.",
        "",
        table(
            [
                "stage",
                "baseline cold",
                "cold",
                "increment",
                "increment / cold",
                "images computed / reused (increment)",
            ],
            rows,
        ),
        "",
        "### Targets",
        "",
        table(["target", "measured", "verdict"], checks),
    ]
    return "\n".join(lines)


def own_seconds(run: dict[str, Any], stage: str) -> float:
    """What a stage took in this run: summary.json's `stage_seconds` keeps a cached stage's
    seconds of the run that computed it, so a `Cached` stage took none here."""
    if run["tasks"].get(stage) == "Cached":
        return 0.0
    return float(run["stage_seconds"].get(stage, 0.0))


def cached_by_design(task: str) -> bool:
    return task.startswith(("check_data", "promote_model", "write_report", "propose_promotion"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        write_section(args.out, args.section, render(data), TITLE)
        return 0
    resolve_inputs(args)
    work = args.workdir or Path(tempfile.gettempdir()) / "catdog-increment"
    work.mkdir(parents=True, exist_ok=True)
    sources = Path(tempfile.mkdtemp(prefix="catdog-increment-src-"))
    snapshot = snapshot_sources(sources / "now")
    baseline = snapshot_revision(args.baseline, sources / "baseline")
    raw = RawLog(args.out.with_suffix(f".{args.section}.json"))
    real = real_images(args.data, work)
    log(f"building the {args.factor}x dataset")
    full = enlarged(real, args.factor, work)
    data, held = split_folder(full, work, args.share)
    raw.data.update(
        started=now(),
        factor=args.factor,
        share=args.share,
        baseline=args.baseline,
        seed=args.seed,
        command=command_line(),
        environment={**snapshot_facts(snapshot), "CPU flags": bf16_flags()},
        images_before=sum(1 for _ in data.rglob("*.jpg")),
        held_back=len(held),
        runs=[],
    )
    for fresh in ("artifacts-baseline", "artifacts", "prefect-baseline", "prefect"):
        shutil.rmtree(work / fresh, ignore_errors=True)
    plan = [
        ("baseline", work / "artifacts-baseline", Path(baseline["path"])),
        ("cold", work / "artifacts", Path(snapshot["path"])),
        ("increment", work / "artifacts", Path(snapshot["path"])),
        ("unchanged", work / "artifacts", Path(snapshot["path"])),
    ]
    for label, artifacts, source in plan:
        if label == "increment":
            for relative in held:
                (data / relative).parent.mkdir(parents=True, exist_ok=True)
                os.link(full / relative, data / relative)
        raw.data["runs"].append(flow_run(args, label, data, artifacts, source, work))
        raw.save()  # the section is written once, whole: a partial one is no result
        if label == "baseline":
            shutil.rmtree(artifacts, ignore_errors=True)  # its disk is not needed any more
    write_section(args.out, args.section, render(raw.data), TITLE)
    shutil.rmtree(sources, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
