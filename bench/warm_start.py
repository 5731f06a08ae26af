"""Warm starts measured: a 5% increment of the real data, retrained cold (20 epochs) against
warm-started from production (5 epochs), three seeds, for model1 and model4.

For each model and seed: production is trained on the real data less 5% of its training images
(`--epochs 20`); its artifacts folder is copied twice; then the whole data is trained in one
copy cold (`--epochs 20`) and in the other with `--warm-start production --epochs 5`. Each
run's validation accuracy (of the epoch its model file holds), test accuracy and training
seconds come from its summary.json.

    .venv/bin/python bench/warm_start.py        # about 40 minutes on two cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH,
    SHARED,
    bf16_flags,
    catdog_env,
    command_line,
    environment_markdown,
    fmt,
    measure_catdog,
    now,
    run_facts,
    table,
    write_section,
)

REPO = Path(__file__).resolve().parents[1]


def datasets(archive: Path, work: Path, increment: float) -> tuple[Path, Path, int]:
    """The real data as a folder (`whole`), and the same less `increment` of every class's
    training images (`before`); how many training images the increment holds."""
    whole, before = work / "whole", work / "before"
    with zipfile.ZipFile(archive) as handle:
        names = sorted(n for n in handle.namelist() if n.endswith(".jpg"))
        handle.extractall(work / "zip", names)
    root = next((work / "zip").iterdir())
    shutil.copytree(root, whole)
    shutil.copytree(root, before)
    held = 0
    for folder in sorted((before / "train").iterdir()):
        images = sorted(folder.glob("*.jpg"))
        for path in images[len(images) - int(len(images) * increment) :]:
            path.unlink()
            held += 1
    return whole, before, held


def run(
    data: Path, artifacts: Path, model: str, seed: int, epochs: int, log: Path, *extra: str
) -> dict[str, Any]:
    command = [sys.executable, "-m", "catdog", "run", "--data", str(data)]
    command += ["--models", model, "--seed", str(seed), "--epochs", str(epochs)]
    command += ["--artifacts", str(artifacts), "--no-export", *extra]
    measured, summary = measure_catdog(
        command, log, artifacts, timeout=3600, env=catdog_env(None, artifacts.parent / "home")
    )
    if summary is None:
        raise RuntimeError(f"{' '.join(command)}: {measured.error}")
    facts = summary["models"][model]
    best = facts["best_epoch"]
    return {
        "wall_seconds": measured.wall_seconds,
        "epoch_seconds": sum(facts["epoch_seconds"]),  # training alone
        "train_seconds": facts["train_seconds"],  # with its decode (and features) stages
        "val_accuracy": facts["history"]["val_accuracy"][best - 1],
        "test_accuracy": facts["test_accuracy"],
        "epochs": facts["epochs"],
        "warm_start": facts.get("warm_start"),
    }


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    half = (max(values) - min(values)) / 2
    return f"{100 * mean:.1f}% ± {100 * half:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data/cats_and_dogs_filtered.zip")
    parser.add_argument("--weights", default=str(SHARED / "weights/mobilenet_v2_1.0_224_no_top.h5"))
    parser.add_argument("--models", default="model1,model4")
    parser.add_argument("--seeds", default="1337,1,2")
    parser.add_argument("--increment", type=float, default=0.05)
    parser.add_argument("--cold-epochs", type=int, default=20)
    parser.add_argument("--warm-epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args()

    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        whole, before, held = datasets(args.data.resolve(), work, args.increment)
        weights = ["--weights", args.weights]
        for model in args.models.split(","):
            for seed in map(int, args.seeds.split(",")):
                label = f"{model}-{seed}"
                base = work / label / "production"
                run(
                    before,
                    base,
                    model,
                    seed,
                    args.cold_epochs,
                    work / f"{label}.base.log",
                    *weights,
                )
                copies = {kind: work / label / kind for kind in ("cold", "warm")}
                for copy in copies.values():
                    shutil.copytree(base, copy, symlinks=True)
                cold = run(
                    whole,
                    copies["cold"],
                    model,
                    seed,
                    args.cold_epochs,
                    work / f"{label}.cold.log",
                    *weights,
                )
                warm = run(
                    whole,
                    copies["warm"],
                    model,
                    seed,
                    args.warm_epochs,
                    work / f"{label}.warm.log",
                    *weights,
                    "--warm-start",
                    "production",
                )
                results.setdefault(model, {})[str(seed)] = {"cold": cold, "warm": warm}
                print(label, json.dumps(results[model][str(seed)]), flush=True)

    rows = []
    for model, by_seed in results.items():
        for kind, epochs in (("cold", args.cold_epochs), ("warm", args.warm_epochs)):
            runs = [by_seed[seed][kind] for seed in by_seed]
            rows.append(
                [
                    model,
                    f"{kind}, {epochs} epochs",
                    spread([r["val_accuracy"] for r in runs]),
                    spread([r["test_accuracy"] for r in runs]),
                    fmt(statistics.mean(r["epoch_seconds"] for r in runs), 0, " s"),
                    fmt(statistics.mean(r["train_seconds"] for r in runs), 0, " s"),
                    fmt(statistics.mean(r["wall_seconds"] for r in runs), 0, " s"),
                ]
            )
    body = "\n".join(
        [
            f"## Warm starts: a 5% increment, cold against warm ({now()})",
            "",
            f"`{command_line()}`",
            "",
            environment_markdown(
                {"CPU flags": bf16_flags(), "commit": run_facts()["commit"], "seeds": args.seeds}
            ),
            "",
            f"Production trained on the real data less {held} training images "
            f"({args.increment:.0%}), {args.cold_epochs} epochs; then the whole data, cold "
            f"({args.cold_epochs} epochs) and warm-started from production "
            f"({args.warm_epochs} epochs). Accuracy: mean ± half the range over the seeds; "
            "seconds: means.",
            "",
            table(
                [
                    "model",
                    "retraining",
                    "validation accuracy (saved epoch)",
                    "test accuracy",
                    "training (epochs)",
                    "training with its decode and features",
                    "whole run",
                ],
                rows,
            ),
        ]
    )
    write_section(args.out, "warm-start", body, f"Warm starts ({now()})")
    (args.out.parent / "RESULTS.warm-start.json").write_text(json.dumps(results, indent=2) + "\n")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
