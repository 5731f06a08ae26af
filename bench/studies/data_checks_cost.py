"""What the data checks cost: a share of a cold default run, and seconds of a cached rerun.

1. A cold default run (every default model, `--epochs`, 20 by default) of the checkout: the
   seconds of the stages the data checks added (inspect_images, profile_data,
   find_suspect_labels), against the run's wall time.
2. A fully cached rerun of the default models, before the data checks (`--before`, a commit)
   and with them, each on its own artifacts folder warmed by a one-epoch cold run; the cached
   reruns alternate, `--reruns` times each, and their medians are compared.

    .venv/bin/python bench/studies/data_checks_cost.py [--epochs 20] [--before 9d7c971]

Writes section `data-checks-cost` of bench/RESULTS.md and RESULTS.data-checks-cost.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from statistics import median

# The repository root on the path: `bench` imports as a package, whichever script runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import (
    BENCH,
    SHARED,
    bf16_flags,
    catdog_env,
    environment_markdown,
    flow_script,
    log,
    measure_catdog,
    run_facts,
    snapshot_facts,
    snapshot_revision,
    snapshot_sources,
    table,
    write_section,
)

CHECK_STAGES = ("inspect_images", "profile_data", "find_suspect_labels")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "cats_and_dogs_filtered.zip")
    parser.add_argument(
        "--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5"
    )
    parser.add_argument("--epochs", type=int, default=20, help="of the cold default run")
    parser.add_argument("--before", default="9d7c971", help="a commit without the data checks")
    parser.add_argument("--reruns", type=int, default=3)
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        after = snapshot_sources(work / "after")
        before_root = Path(snapshot_revision(args.before, work / "before")["path"])
        sources = {"before": before_root, "after": Path(after["path"])}

        def command(side: str, artifacts: Path, epochs: int) -> list[str]:
            return [
                sys.executable,
                str(flow_script(sources[side])),
                "--data",
                str(args.data),
                "--weights",
                str(args.weights),
                "--epochs",
                str(epochs),
                "--artifacts",
                str(artifacts),
            ]

        def run(side: str, artifacts: Path, epochs: int, label: str):
            env = catdog_env(sources[side], work / f"home-{side}")
            measured, summary = measure_catdog(
                command(side, artifacts, epochs),
                work / "logs" / f"{label}.log",
                artifacts,
                timeout=3 * 3600,
                env=env,
            )
            if summary is None:
                raise SystemExit(f"{label} failed: {measured.error}")
            log(f"{label}: {measured.wall_seconds:.1f} s")
            return measured, summary

        full, full_summary = run("after", work / "full", args.epochs, f"cold-{args.epochs}")
        stage_seconds = {
            name: full_summary["stage_seconds"].get(name, 0.0) for name in CHECK_STAGES
        }
        added = sum(stage_seconds.values())

        for side in sources:
            run(side, work / f"warm-{side}", 1, f"warm-{side}")
        cached: dict[str, list[float]] = {side: [] for side in sources}
        for attempt in range(args.reruns):
            for side in sources:
                measured, _ = run(side, work / f"warm-{side}", 1, f"cached-{side}-{attempt}")
                cached[side].append(measured.wall_seconds)

    medians = {side: median(values) for side, values in cached.items()}
    raw = {
        "cold": {
            "epochs": args.epochs,
            "wall_seconds": full.wall_seconds,
            "stage_seconds": full_summary["stage_seconds"],
        },
        "check_stage_seconds": stage_seconds,
        "cached_seconds": cached,
        "before": args.before,
        "cpu": bf16_flags(),
    }
    (args.out.parent / "RESULTS.data-checks-cost.json").write_text(json.dumps(raw, indent=1) + "\n")
    facts = run_facts()
    body = "\n".join(
        [
            f"## What the data checks cost ({facts['date']})",
            "",
            f"`{facts['command']}` on {args.data.name}, the default models.",
            "",
            f"- cold default run ({args.epochs} epochs): {full.wall_seconds:.0f} s; the data "
            f"checks' stages took {added:.1f} s of it ("
            + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in stage_seconds.items())
            + f"), **{added / full.wall_seconds:.1%}** (goal at most 10%)",
            f"- fully cached rerun, median of {args.reruns} alternating: "
            f"{medians['before']:.1f} s before the data checks ({args.before}), "
            f"{medians['after']:.1f} s with them: **{medians['after'] - medians['before']:+.2f} "
            "s** (goal under 1 s)",
            "",
            table(
                ["rerun", *(f"#{i + 1}" for i in range(args.reruns))],
                [[side, *(f"{s:.1f} s" for s in cached[side])] for side in cached],
            ),
            "",
            environment_markdown({"CPU flags": bf16_flags(), **snapshot_facts(after)}),
        ]
    )
    write_section(args.out, "data-checks-cost", body, "What the data checks cost")
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
