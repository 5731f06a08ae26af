"""Seed-to-seed spread of catdog's results, and paired comparisons of settings across seeds.

    python bench/seeds.py --models model1 --seeds 1337,1,2 \
        --variant float32=--precision=float32 --variant bf16=--precision=mixed_bfloat16 \
        --section precision-model1

    python bench/seeds.py --models model4,model4_finetune --seeds 1337,1,2 --section seeds-model4

One accuracy figure from one seed says little on 800 validation and 200 test images (a binomial
standard error of about 1.6 and 3 points). For each seed (which moves the test/validation cut,
the shuffling and the initial weights), every variant runs on one artifacts folder, so variants
share the decoded images and differ only in what they change; their order alternates from seed
to seed so that neither always runs on a warmer machine. Each run is a fresh training. Writes a
Markdown section into --out (default bench/RESULTS.md) and the raw figures beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
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
    flow_script,
    fmt,
    keep_logs,
    log,
    measure_catdog,
    median_after_first,
    now,
    own_epoch_seconds,
    resolve_inputs,
    snapshot_facts,
    snapshot_revision,
    snapshot_sources,
    table,
    write_section,
)
from catdog import catalog


def _variant(value: str) -> tuple[str, list[str]]:
    name, _, extra = value.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"--variant {value!r}: expected NAME=ARGS")
    return name, extra.split() if extra else []


def _revision(extra: list[str]) -> str | None:
    """The git revision a variant runs catdog at ('@REV' first in its arguments), if any."""
    return extra[0][1:] if extra and extra[0].startswith("@") else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python bench/seeds.py", description=__doc__.splitlines()[0]
    )
    add_input_arguments(parser)
    parser.add_argument("--models", default="model1", help="comma-separated (model1)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument(
        "--seeds", default="1337,1,2", help="comma-separated seeds (1337,1,2; 1337 is the default)"
    )
    parser.add_argument(
        "--variant",
        type=_variant,
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="a setting to compare, as extra flow arguments split on spaces, e.g. "
        "'bf16=--precision=mixed_bfloat16', or '@REV' first to run catdog as committed at git "
        "revision REV, e.g. 'before=@29d62a5' (repeatable; the first is the reference; "
        "default: one variant with the defaults)",
    )
    parser.add_argument(
        "--max-images-per-class", type=int, default=None, help="quick checks on a slice"
    )
    parser.add_argument("--section", default="seeds", help="section name in --out (seeds)")
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="per run, seconds")
    add_from_json_argument(parser)
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())["args"]
        for key in ("models", "epochs", "section"):
            setattr(args, key, saved[key])
        args.variants = [(name, list(extra)) for name, extra in saved["variants"]]
        return args
    resolve_inputs(args)
    args.seed_list = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    args.variants = args.variant or [("defaults", [])]
    return args


def model_figures(summary: dict[str, Any], model: str) -> dict[str, Any]:
    """What the section compares for one model of one run."""
    everything = summary["models"]
    entry = everything[model]
    val = entry["history"]["val_accuracy"]
    return {
        "val_last": val[-1],
        "val_last5": statistics.fmean(val[-5:]),
        "test": entry["test_accuracy"],
        "epoch": median_after_first(own_epoch_seconds(everything, model)),
        "train_seconds": entry["train_seconds"],
        "best_epoch_val": max(val),
    }


def run_all(args: argparse.Namespace, work: Path, raw: RawLog) -> list[dict[str, Any]]:
    """Every (seed, variant) run, alternating the variants' order from seed to seed."""
    source = work / "src"
    raw.data["snapshot"] = snapshot_sources(source)
    sources, revisions = {}, {}
    for name, extra in args.variants:
        if revision := _revision(extra):
            revisions[name] = snapshot_revision(revision, work / f"src-{name}")
            sources[name] = Path(revisions[name]["path"])
        else:
            sources[name] = source
    raw.data["revisions"] = revisions
    home = work / "prefect-home"
    runs: list[dict[str, Any]] = []
    for index, seed in enumerate(args.seed_list):
        order = args.variants if index % 2 == 0 else list(reversed(args.variants))
        for name, extra in order:
            flow_args = extra[1:] if name in revisions else extra
            command = [
                sys.executable,
                str(flow_script(sources[name])),
                "--data",
                str(args.data),
                "--weights",
                args.weights,
                "--models",
                args.models,
                "--epochs",
                str(args.epochs),
                "--finetune-epochs",
                str(args.finetune_epochs),
                "--seed",
                str(seed),
                "--artifacts",
                str(work / f"seed-{seed}"),
                *(
                    ["--max-images-per-class", str(args.max_images_per_class)]
                    if args.max_images_per_class
                    else []
                ),
                *flow_args,
            ]
            log(f"seed {seed}, {name} ...")
            run, summary = measure_catdog(
                command,
                work / f"seed-{seed}-{name}.log",
                work / f"seed-{seed}",
                timeout=args.timeout,
                env=catdog_env(sources[name], home),
            )
            figures = summary and {m: model_figures(summary, m) for m in summary["models"]}
            log(
                f"seed {seed}, {name}: {run.wall_seconds:.0f} s"
                + (f" ERROR {run.error}" if run.error else "")
            )
            runs.append(
                {
                    "seed": seed,
                    "variant": name,
                    "command": command,
                    "run": run.to_json(),
                    "figures": figures,
                }
            )
            raw.data["runs"] = runs
            raw.save()
    return runs


def _figures(runs: list[dict[str, Any]], variant: str, model: str, key: str) -> dict[int, float]:
    """One figure of one model, per seed, for the runs of one variant."""
    return {
        run["seed"]: run["figures"][model][key]
        for run in runs
        if run["variant"] == variant and (run.get("figures") or {}).get(model)
    }


def _deltas(
    runs: list[dict[str, Any]], reference: str, variant: str, model: str, key: str, seeds: list[int]
) -> list[float]:
    """variant − reference, seed by seed."""
    ours, ref = _figures(runs, variant, model, key), _figures(runs, reference, model, key)
    return [ours[seed] - ref[seed] for seed in seeds]


def _pct(value: float | None) -> str:
    return fmt(None if value is None else 100 * value, 1, "%")


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    spread = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{100 * statistics.fmean(values):.1f}%{spread}"


def render(args: argparse.Namespace, data: dict[str, Any]) -> str:
    """The Markdown section."""
    snapshot = data.get("snapshot") or {}
    runs = data.get("runs") or []
    facts = snapshot_facts(snapshot)
    variants = [name for name, _ in args.variants]
    lines = [
        f"## Across seeds: {args.models}, {args.epochs} epochs ({data.get('finished') or now()})",
        "",
        environment_markdown(facts),
        f"- command: `{data.get('command') or command_line()}`",
        "- variants: "
        + "; ".join(
            f"{name} = `{' '.join(extra) or '(defaults)'}`"
            + (f" (catdog as committed at {rev})" if (rev := _revision(extra)) else "")
            for name, extra in args.variants
        ),
        "",
        "Each seed moves the validation/test cut, the shuffling and the initial weights; the "
        "variants of a seed share its decoded images. Epoch = median of epochs 2..N.",
        "",
    ]
    models = catalog.with_prerequisites([m.strip() for m in args.models.split(",")])
    rows = []
    for run in runs:
        for model in models:
            fig = (run.get("figures") or {}).get(model)
            if fig is None:
                rows.append([str(run["seed"]), run["variant"], model, run["run"]["error"] or "–"])
                continue
            rows.append(
                [
                    str(run["seed"]),
                    run["variant"],
                    model,
                    _pct(fig["val_last"]),
                    _pct(fig["val_last5"]),
                    _pct(fig["test"]),
                    fmt(fig["epoch"], 2, " s"),
                    fmt(fig["train_seconds"], 1, " s"),
                ]
            )
    lines += [
        table(
            [
                "seed",
                "variant",
                "model",
                "val acc (last epoch)",
                "val acc (mean last 5)",
                "test acc",
                "epoch (median)",
                "train seconds",
            ],
            rows,
        ),
        "",
    ]

    def figures(variant: str, model: str, key: str) -> dict[int, float]:
        return _figures(runs, variant, model, key)

    summary_rows = []
    for model in models:
        for variant in variants:
            summary_rows.append(
                [
                    model,
                    variant,
                    str(len(figures(variant, model, "val_last"))),
                    _mean_sd(list(figures(variant, model, "val_last").values())),
                    _mean_sd(list(figures(variant, model, "val_last5").values())),
                    _mean_sd(list(figures(variant, model, "test").values())),
                ]
            )
    lines += [
        "Mean ± standard deviation over seeds:",
        "",
        table(
            [
                "model",
                "variant",
                "seeds",
                "val acc (last epoch)",
                "val acc (mean last 5)",
                "test acc",
            ],
            summary_rows,
        ),
        "",
    ]
    reference = variants[0]
    for model in models:
        for variant in variants[1:]:
            paired = sorted(
                set(figures(reference, model, "val_last"))
                & set(figures(variant, model, "val_last"))
            )
            if not paired:
                continue

            def deltas(key: str) -> list[float]:
                return _deltas(runs, reference, variant, model, key, paired)  # noqa: B023

            epoch_ratios = [
                figures(variant, model, "epoch")[s] / figures(reference, model, "epoch")[s]
                for s in paired
            ]
            last, last5 = deltas("val_last"), deltas("val_last5")
            lines.append(
                f"- {model}, {variant} − {reference} over {len(paired)} paired seeds: validation "
                f"accuracy {100 * statistics.fmean(last):+.1f} points at the last epoch ("
                + ", ".join(f"seed {s}: {100 * d:+.1f}" for s, d in zip(paired, last, strict=True))
                + f"), "
                f"{100 * statistics.fmean(last5):+.1f} over the last 5 epochs; test "
                f"{100 * statistics.fmean(deltas('test')):+.1f} points; epoch time "
                f"{statistics.median(epoch_ratios):.3f}x (median of the per-seed ratios "
                f"{', '.join(f'{r:.3f}' for r in epoch_ratios)})"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        body = render(args, json.loads(args.from_json.read_text()))
        write_section(args.out, args.section, body, "catdog benchmark results")
        print(body)
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="catdog-seeds-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    raw = RawLog(args.out.with_name(f"RESULTS.{args.section}.json"))
    raw.data.update(
        command=command_line(),
        args={k: v for k, v in vars(args).items() if k != "data"} | {"data": str(args.data)},
    )
    log(f"work folder {work}")
    try:
        run_all(args, work, raw)
        raw.data["finished"] = now()
        raw.save()
        body = render(args, raw.data)
        write_section(args.out, args.section, body, "catdog benchmark results")
        log(f"wrote {args.out} and {raw.path}")
    finally:
        kept = keep_logs(work, args.section)
        if kept:
            log(f"logs kept in {kept}")
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
