"""What the export check costs a run: peak memory of the run's process tree, and seconds.

    .venv/bin/python bench/export_cost.py [--models model1,model4] [--epochs 2]
        [--variant before=@REV] [--variant after=.]

For each variant of catdog (`.`: the checkout; `@REV`: as committed at git revision REV), two
cold runs on the real data: `--no-export`, then with exports (the default). Peak memory is the
largest sum of the RSS of every process of the run (the flow, its temporary API server, the
probe processes), sampled every 0.2 s; seconds are the runs' and the probe processes'. Writes
section `export-cost` of bench/RESULTS.md and its raw figures in RESULTS.export-cost.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

# The repository root on the path: `bench` imports as a package, whichever script runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH,
    GIB,
    RawLog,
    add_input_arguments,
    catdog_env,
    environment_markdown,
    flow_script,
    log,
    measure,
    read_summary,
    resolve_inputs,
    run_facts,
    snapshot_revision,
    table,
    write_section,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_input_arguments(parser)
    parser.add_argument("--models", default="model1,model4")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="NAME=@REV|.",
        help="catdog to measure (repeatable; default: after=. only)",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args(argv)
    resolve_inputs(args)
    args.variant = [v.split("=", 1) for v in (args.variant or ["after=."])]
    return args


def measure_variant(args: argparse.Namespace, name: str, where: str, work: Path) -> dict[str, Any]:
    source = None
    if where != ".":
        source = work / f"{name}-src"
        snapshot_revision(where.removeprefix("@"), source)
    out: dict[str, Any] = {"source": where}
    for mode in ("--no-export", "--export"):
        artifacts = work / f"{name}{mode}"
        command = [
            sys.executable,
            str(flow_script(source)),
            "--data",
            str(args.data),
            "--weights",
            args.weights,
            "--models",
            args.models,
            "--epochs",
            str(args.epochs),
            mode,
            "--artifacts",
            str(artifacts),
        ]
        log(f"{name}: {mode}")
        env = catdog_env(source, work / f"{name}{mode}-prefect")
        # Not in the checkout: the probe's `python -m catdog.serving` would import its code.
        run = measure(command, work / f"{name}{mode}.log", env=env, sample_every=0.2, cwd=work)
        if run.error:
            raise SystemExit(f"{name} {mode}: {run.error}")
        summary = read_summary(artifacts)
        out[mode.removeprefix("--")] = {
            "tree_peak_bytes": run.tree_rss_bytes,
            "wall_seconds": run.wall_seconds,
            "promoted": summary["promotion"]["promoted"],
            "export_check": summary["promotion"].get("export_check"),
        }
    return out


def render(data: dict[str, Any]) -> str:
    rows = []
    for name, variant in data["variants"].items():
        without, with_ = variant["no-export"], variant["export"]
        rows.append(
            [
                f"{name} ({variant['source']})",
                f"{without['tree_peak_bytes'] / GIB:.2f}",
                f"{with_['tree_peak_bytes'] / GIB:.2f}",
                f"{(with_['tree_peak_bytes'] - without['tree_peak_bytes']) / GIB:+.2f}",
                f"{without['wall_seconds']:.0f}",
                f"{with_['wall_seconds']:.0f}",
                f"{sum(r['seconds'] for r in with_['export_check']['runtimes']):.1f}",
                "yes" if with_["promoted"] and with_["export_check"]["passed"] else "no",
            ]
        )
    return "\n".join(
        [
            "## What the export check costs a run (export-cost)",
            "",
            f"{data['date']}, commit {data['commit']}. `{data['command']}`",
            "",
            environment_markdown({"bf16 flags": data["bf16_flags"]}),
            "",
            f"Cold runs of `--models {data['models']} --epochs {data['epochs']}` on the real "
            "data, without and with exports. Peak: the largest sum of the RSS of the run's "
            "processes, sampled every 0.2 s.",
            "",
            table(
                [
                    "catdog",
                    "peak GiB --no-export",
                    "peak GiB with exports",
                    "added GiB",
                    "run s --no-export",
                    "run s with exports",
                    "probe process s",
                    "promoted, exports checked",
                ],
                rows,
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raw = RawLog(BENCH / "RESULTS.export-cost.json")
    raw.data = {
        **run_facts(),
        "models": args.models,
        "epochs": args.epochs,
        "variants": {},
    }
    with tempfile.TemporaryDirectory(prefix="catdog-export-cost-") as work:
        for name, where in args.variant:
            raw.data["variants"][name] = measure_variant(args, name, where, Path(work))
            raw.save()
    write_section(args.out, "export-cost", render(raw.data), "Benchmark results")
    print(render(raw.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
