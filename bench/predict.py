"""`python -m catdog predict` through the LiteRT export against through Keras, side by side.

    .venv/bin/python bench/predict.py --model artifacts/production/models/0001-model4.keras \
        --data ../shared/data/cats_and_dogs_filtered.zip [--repeats 5] [--images 500]

The model is exported first (`python -m catdog export`). Then, alternating the two runtimes in
one run: wall time from start to the printed line for one image, `--repeats` times each; and
the wall time for a folder of `--images` validation images. Writes section `predict` of
bench/RESULTS.md and its raw figures in RESULTS.predict.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

# The repository root on the path: `bench` imports as a package, whichever script runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH,
    bf16_flags,
    command_line,
    environment_markdown,
    fmt,
    now,
    run_facts,
    table,
    write_section,
)

RUNTIMES = ("litert", "keras")


def _predict(args: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "catdog", "predict", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return seconds


def _images(data: Path, folder: Path, count: int) -> list[Path]:
    """`count` validation images of the real dataset, half of each class."""
    with zipfile.ZipFile(data) as archive:
        names = sorted(n for n in archive.namelist() if "/validation/" in n and n.endswith(".jpg"))
        cats = [n for n in names if "/cats/" in n][: count // 2]
        dogs = [n for n in names if "/dogs/" in n][: count - count // 2]
        paths = []
        for name in cats + dogs:
            target = folder / Path(name).name
            target.write_bytes(archive.read(name))
            paths.append(target)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a trained .keras model")
    parser.add_argument("--data", type=Path, required=True, help="the dataset zip (images)")
    parser.add_argument("--classes", default="cats,dogs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        export = work / "export"
        subprocess.run(
            [
                *(sys.executable, "-m", "catdog", "export", "--model", str(args.model)),
                *("--out", str(export), "--classes", args.classes),
            ],
            check=True,
            capture_output=True,
        )
        folder = work / "images"
        folder.mkdir()
        paths = _images(args.data, folder, args.images)
        model = {"litert": str(export), "keras": str(args.model)}
        one: dict[str, list[float]] = {runtime: [] for runtime in RUNTIMES}
        many: dict[str, list[float]] = {runtime: [] for runtime in RUNTIMES}
        for _ in range(args.repeats):
            for runtime in RUNTIMES:
                one[runtime].append(
                    _predict([str(paths[0]), "--model", model[runtime], "--classes", args.classes])
                )
        for _ in range(2):
            for runtime in RUNTIMES:
                many[runtime].append(
                    _predict([str(folder), "--model", model[runtime], "--classes", args.classes])
                )

    rows = []
    for runtime in RUNTIMES:
        best_folder = min(many[runtime])
        rows.append(
            [
                runtime,
                fmt(statistics.median(one[runtime]), 2, " s"),
                fmt(min(one[runtime]), 2, " s"),
                fmt(best_folder, 1, " s"),
                fmt(args.images / best_folder, 0, " images/s"),
            ]
        )
    ratio = statistics.median(one["keras"]) / statistics.median(one["litert"])
    body = "\n".join(
        [
            f"## predict: LiteRT against Keras ({now()})",
            "",
            f"`{command_line()}`",
            "",
            environment_markdown(
                {
                    "CPU flags": bf16_flags(),
                    "commit": run_facts()["commit"],
                    "model": str(args.model),
                }
            ),
            "",
            table(
                [
                    "runtime",
                    f"one image, median of {args.repeats}",
                    "one image, best",
                    f"folder of {args.images} (best of 2)",
                    "throughput (whole command)",
                ],
                rows,
            ),
            "",
            f"One image: Keras takes {ratio:.1f}x as long as LiteRT, start to printed line "
            "(Python start, imports, model load, decode, prediction). The folder's time is the "
            "whole command too, its start included.",
        ]
    )
    write_section(args.out, "predict", body, f"predict: LiteRT against Keras ({now()})")
    raw = {"one_image_seconds": one, "folder_seconds": many, "images": args.images}
    (args.out.parent / "RESULTS.predict.json").write_text(json.dumps(raw, indent=2) + "\n")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
