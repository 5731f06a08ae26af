"""The assignment's protocol with catdog on the real data, scored against its targets.

    python bench/assignment.py [--data ../shared/data/cats_and_dogs_filtered.zip] \
        [--weights ../shared/weights/mobilenet_v2_1.0_224_no_top.h5] [--epochs 20] \
        [--finetune-epochs 10] [--out bench/ASSIGNMENT.md]

Runs `flows/train_flow.py --models model1,model2,model3,model4,model4_finetune` on a fresh
artifacts folder (wall time and peak memory measured from here), then the same command again
(fully cached) and the default four-model flow on the same folder (also all cache hits), and
writes a Markdown section: validation accuracy at the last epoch, test accuracy, train seconds
and parameters per model, the best model's test accuracy, and each target's verdict.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# The repository root on the path: `bench` imports as a package, whichever script runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH,
    RawLog,
    add_from_json_argument,
    add_input_arguments,
    catdog_env,
    command_line,
    environment_markdown,
    feature_seconds,
    flow_script,
    fmt,
    fmt_gib,
    keep_logs,
    log,
    measure_catdog,
    median_after_first,
    now,
    own_epoch_seconds,
    ratio,
    resolve_inputs,
    snapshot_facts,
    snapshot_sources,
    table,
    verdict,
    write_section,
)
from catdog import catalog

MODELS = catalog.MODEL_NAMES
DEFAULT_MODELS = catalog.DEFAULT_MODELS
# (model, metric, threshold): the assignment's targets. model1 is the blog's CNN, judged by the
# blog's own result ("stabilized between 56% to 60%"); over seeds, not one (see the note below).
TARGETS = (
    ("model1", "val_acc", 0.56),
    ("model2", "val_acc", 0.60),
    ("model3", "val_acc", 0.70),
    ("model4", "val_acc", 0.95),
    ("model4_finetune", "test_acc", 0.98),
)
METRIC_LABEL = {"val_acc": "validation accuracy, last epoch", "test_acc": "test accuracy"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python bench/assignment.py", description=__doc__.splitlines()[0]
    )
    add_input_arguments(parser)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument(
        "--max-images-per-class", type=int, default=None, help="quick checks on a slice"
    )
    parser.add_argument(
        "--models",
        type=lambda value: tuple(catalog.with_prerequisites(value.split(","))),
        default=MODELS,
        help="a part of the protocol: these models (and what they start from); all by default",
    )
    parser.add_argument(
        "--section", default="assignment", help="section of --out to write (assignment)"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "ASSIGNMENT.md")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--no-snapshot", action="store_true", help="run from the checkout")
    parser.add_argument("--no-rerun", action="store_true", help="skip the cached reruns")
    parser.add_argument("--timeout", type=float, default=4 * 3600)
    add_from_json_argument(parser)
    args = parser.parse_args(argv)
    resolve_inputs(args)
    return args


def flow_command(
    args: argparse.Namespace, source: Path | None, artifacts: Path, models: tuple[str, ...]
) -> list[str]:
    """The catdog command line of the protocol."""
    return [
        sys.executable,
        str(flow_script(source)),
        "--data",
        str(args.data),
        "--weights",
        args.weights,
        "--models",
        ",".join(models),
        "--epochs",
        str(args.epochs),
        "--finetune-epochs",
        str(args.finetune_epochs),
        "--seed",
        str(args.seed),
        "--artifacts",
        str(artifacts),
        *(
            ["--max-images-per-class", str(args.max_images_per_class)]
            if args.max_images_per_class
            else []
        ),
    ]


def model_rows(summary: dict[str, Any]) -> tuple[list[list[str]], dict[str, dict[str, Any]]]:
    """One table row per model, and the figures the targets are judged on."""
    rows: list[list[str]] = []
    figures: dict[str, dict[str, Any]] = {}
    everything = summary.get("models", {})
    for name, model in everything.items():
        val = model["history"]["val_accuracy"]
        seconds = own_epoch_seconds(everything, name)
        figures[name] = {"val_acc": val[-1] if val else None, "test_acc": model["test_accuracy"]}
        rows.append(
            [
                name,
                str(model["epochs"]),
                fmt(100 * val[-1], 1, "%") if val else "–",
                fmt(100 * max(val), 1, "%") if val else "–",
                fmt(100 * model["test_accuracy"], 1, "%"),
                fmt(model["train_seconds"], 1, " s"),
                fmt(median_after_first(seconds), 2, " s"),
                f"{model['trainable_params']:,} / {model['total_params']:,}",
            ]
        )
    return rows, figures


def states(summary: dict[str, Any] | None) -> str:
    """Tally of task states, e.g. '14/15 Cached, 1/15 Completed'."""
    values = list(((summary or {}).get("tasks") or {}).values())
    tally: dict[str, int] = {}
    for value in values:
        tally[value] = tally.get(value, 0) + 1
    return ", ".join(f"{n}/{len(values)} {k}" for k, n in sorted(tally.items())) or "–"


def rerender(args: argparse.Namespace) -> str:
    """Write the section again from the raw JSON of an earlier run."""
    data = json.loads(args.from_json.read_text())
    snapshot = data.get("snapshot") or {}
    command = data.get("catdog_command")
    if command is None:  # written before the command was stored: rebuild it
        source = Path(snapshot["path"]) if snapshot else None
        work = source.parent if source else Path("<work>")
        command = flow_command(args, source, work / "artifacts", args.models)
    first = data["first"]
    body = render(
        args,
        first,
        first.get("summary"),
        data.get("reruns") or {},
        snapshot,
        command,
        command_text=data.get("command"),
        finished=data.get("finished"),
    )
    write_section(args.out, args.section, body, "catdog: the assignment's protocol")
    return body


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        print(rerender(args))
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="catdog-assignment-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    source = None
    snapshot: dict[str, Any] = {}
    if not args.no_snapshot:
        source = work / "src"
        shutil.rmtree(source, ignore_errors=True)
        snapshot = snapshot_sources(source)
    artifacts = work / "artifacts"
    # A Prefect home of its own: no SQLite database shared with anyone else's runs.
    env = catdog_env(source, work / "prefect-home")
    raw = RawLog(
        args.out.with_suffix(".json" if args.section == "assignment" else f".{args.section}.json")
    )
    raw.data.update(command=command_line(), snapshot=snapshot)
    log(f"work folder {work}")
    try:
        command = flow_command(args, source, artifacts, args.models)
        raw.data["catdog_command"] = command
        log(f"assignment protocol: {args.epochs} epochs (+{args.finetune_epochs} fine-tuning) ...")
        first, summary = measure_catdog(
            command, work / "first.log", artifacts, timeout=args.timeout, env=env
        )
        log(
            f"first run: {first.wall_seconds:.0f} s"
            + (f" ERROR {first.error}" if first.error else "")
        )
        raw.data["first"] = {
            "run": first.to_json(),
            "summary": summary,
            "feature_seconds": feature_seconds(work / "first.log"),
        }
        raw.save()
        reruns: dict[str, Any] = {}
        if first.error is None and not args.no_rerun:
            reruns_to_time = [("cached", args.models)]
            if set(DEFAULT_MODELS) <= set(args.models):  # else the default flow trains more
                reruns_to_time.append(("cached-default", DEFAULT_MODELS))
            for label, models in reruns_to_time:
                log(f"{label} rerun ({','.join(models)}) ...")
                run, rerun_summary = measure_catdog(
                    flow_command(args, source, artifacts, models),
                    work / f"{label}.log",
                    artifacts,
                    timeout=args.timeout,
                    env=env,
                )
                log(f"{label} rerun: {run.wall_seconds:.1f} s")
                reruns[label] = {"run": run.to_json(), "states": states(rerun_summary)}
            raw.data["reruns"] = reruns
            raw.save()
        raw.data["finished"] = now()
        raw.save()
        body = render(args, raw.data["first"], summary, reruns, snapshot, command)
        write_section(args.out, args.section, body, "catdog: the assignment's protocol")
        log(f"wrote {args.out} and {raw.path}")
    finally:
        kept = keep_logs(work, "assignment")
        if kept:
            log(f"logs kept in {kept}")
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(body)
    return 0


def render(
    args: argparse.Namespace,
    measured: dict[str, Any],
    summary: dict[str, Any] | None,
    reruns: dict[str, Any],
    snapshot: dict[str, Any],
    command: list[str],
    *,
    command_text: str | None = None,
    finished: str | None = None,
) -> str:
    """The Markdown section (fit to paste into bench/RESULTS.md)."""
    import shlex

    first = measured["run"]
    facts = snapshot_facts(snapshot)
    part = "" if set(args.models) == set(MODELS) else f", {', '.join(args.models)} only"
    lines = [
        f"## The assignment's protocol with catdog{part} ({finished or now()})",
        "",
        environment_markdown(facts),
        f"- command: `{command_text or command_line()}`",
        f"- catdog command: `{shlex.join(command)}`",
        "",
    ]
    if summary is None:
        lines.append(f"The run failed: {first['error']}")
        return "\n".join(lines)
    rows, figures = model_rows(summary)
    lines += [
        table(
            [
                "model",
                "epochs",
                "val acc (last epoch)",
                "val acc (best)",
                "test acc",
                "train seconds",
                "epoch (median 2..N)",
                "params (trainable / total)",
            ],
            rows,
        ),
        "",
        "`train seconds` is summary.json's `train_seconds`: training plus the shared decode "
        "stage (and feature extraction for model4*). model4_finetune's epochs continue "
        "model4's (its history holds both, as in the TensorFlow tutorial; its epoch time is "
        "the median of its own fine-tuning epochs after the first).",
        "",
    ]
    best = summary.get("best_model")
    if best:
        lines.append(
            f"- best model by validation accuracy: **{best}**, test accuracy "
            f"**{100 * summary['models'][best]['test_accuracy']:.1f}%**"
        )
    baseline = summary.get("data", {}).get("baseline_accuracy")
    if baseline is not None:
        lines.append(f"- majority-class baseline on the test split: {100 * baseline:.1f}%")
    wall = first["wall_seconds"]
    lines += [
        f"- whole flow, first run: {wall:.1f} s wall, peak memory {fmt_gib(first['peak_bytes'])}"
        f" (largest process {fmt_gib(first['max_rss_bytes'])}, sampled process-tree sum "
        f"{fmt_gib(first['tree_rss_bytes'])}), other processes' CPU meanwhile "
        f"{fmt(first.get('others_cores'), 2)} cores",
    ]
    if measured.get("feature_seconds") is not None:
        lines.append(
            f"- of which MobileNetV2 feature extraction (extract_features, shared by model4 and "
            f"counted in its train seconds): {measured['feature_seconds']:.0f} s"
        )
    for label, text in (
        ("cached", "same command again (fully cached)"),
        ("cached-default", "default four-model flow on the same artifacts"),
    ):
        rerun = reruns.get(label)
        if rerun:
            run = rerun["run"]
            lines.append(
                f"- {text}: {run['wall_seconds']:.1f} s wall "
                f"(**{fmt(ratio(run['wall_seconds'], wall), 4)}x** the first run), task "
                f"states {rerun['states']}, peak memory {fmt_gib(run['peak_bytes'])}"
                + (f", error: {run['error']}" if run["error"] else "")
            )
    checks = []
    for model, metric, threshold in (t for t in TARGETS if t[0] in args.models):
        value = figures.get(model, {}).get(metric)
        checks.append(
            [
                f"{model} {METRIC_LABEL[metric]} ≥ {threshold:.2f}",
                "not run" if value is None else f"{value:.4f}",
                verdict(None if value is None else value >= threshold),
            ]
        )
    lines += ["", "### Targets", "", table(["target", "measured", "verdict"], checks)]
    lines += (
        []
        if "model1" not in args.models
        else [
            "",
            "model1 is the blog's CNN unchanged; its target is the blog's own 56-60%, as a mean of "
            "the last-epoch validation accuracy over seeds 1337, 1 and 2 (`bench/seeds.py`, "
            "bench/RESULTS.md); one seed's reading here swings by a few points either way.",
        ]
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
