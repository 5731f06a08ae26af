"""Scale: the real dataset enlarged 1x, 4x and 10x through the data stages, model1 and model4.

    python bench/scale.py --data ../shared/data/cats_and_dogs_filtered.zip \
        --weights ../shared/weights/mobilenet_v2_1.0_224_no_top.h5 [--factors 1,4,10] [--epochs 2]

Each extra image is a distinct JPEG made from a real one of the same split and class by a
deterministic crop, flip and colour jitter (seeded by the copy's number and the file's path),
so a larger dataset is not the same bytes again (the manifest would drop duplicates) and
decodes like real photographs. Every size runs catdog's flow on fresh artifacts in its own
process (`--models model1,model4`: both decode sizes, the features, a CNN and a head), and the
section reports, per size: the peak memory of the whole process tree, seconds per training
image for each stage and for the whole run, and the disk the artifacts take.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# The repository root on the path: `bench` imports as a package, whichever script runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH,
    RawLog,
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

TITLE = "catdog benchmark results"
MODELS = "model1,model4"


def variant(source: Path, copy: int, relative: str) -> Image.Image:
    """Copy number `copy` of a real image: cropped, maybe mirrored, colour-jittered."""
    rng = np.random.default_rng([copy, zlib.crc32(relative.encode())])
    with Image.open(source) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    scale = rng.uniform(0.75, 0.95)
    crop_w, crop_h = max(8, int(width * scale)), max(8, int(height * scale))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    image = image.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(float(rng.uniform(0.8, 1.2)))
    return image


def real_images(data: Path, work: Path) -> Path:
    """The real archive's image root (train/ and validation/), extracted once."""
    root = work / "real"
    if not root.is_dir():
        with zipfile.ZipFile(data) as archive:
            archive.extractall(work / ".real-tmp")
        inner = next(p for p in (work / ".real-tmp").rglob("train") if p.is_dir()).parent
        inner.rename(root)
        shutil.rmtree(work / ".real-tmp", ignore_errors=True)
    return root


def enlarged(real: Path, factor: int, work: Path) -> Path:
    """`real` with `factor - 1` extra copies of every image (hard links to a shared pool)."""
    pool = work / "variants"
    folder = work / f"x{factor}"
    if folder.is_dir():
        return folder
    sources = sorted(p for p in real.rglob("*.jpg"))
    jobs = [(path, copy) for copy in range(1, factor) for path in sources]

    def make(job: tuple[Path, int]) -> None:
        path, copy = job
        relative = path.relative_to(real).as_posix()
        target = pool / f"{relative[:-4]}.v{copy}.jpg"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            variant(path, copy, relative).save(target.with_suffix(".tmp"), "JPEG", quality=90)
            target.with_suffix(".tmp").rename(target)

    with ThreadPoolExecutor(max_workers=4) as threads:
        list(threads.map(make, jobs))
    tmp = work / f".x{factor}-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for path in sources:
        relative = path.relative_to(real)
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp / relative).hardlink_to(path)
        for copy in range(1, factor):
            name = f"{relative.as_posix()[:-4]}.v{copy}.jpg"
            (tmp / name).hardlink_to(pool / name)
    tmp.rename(folder)
    return folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/scale.py", description=__doc__.splitlines()[0]
    )
    add_input_arguments(parser)
    parser.add_argument("--factors", default="1,4,10", help="dataset sizes, times the real one")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--workdir", type=Path, default=None, help="kept between runs")
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument("--section", default="scale")
    parser.add_argument("--timeout", type=float, default=4 * 3600)
    return parser.parse_args(argv)


def measure_size(
    args: argparse.Namespace, factor: int, data: Path, work: Path, snapshot: Path
) -> dict[str, Any]:
    artifacts = work / f"artifacts-x{factor}"
    shutil.rmtree(artifacts, ignore_errors=True)
    command = [
        sys.executable,
        str(flow_script(snapshot)),
        "--data",
        str(data),
        "--weights",
        str(args.weights),
        "--models",
        MODELS,
        "--epochs",
        str(args.epochs),
        "--seed",
        str(args.seed),
        "--artifacts",
        str(artifacts),
    ]
    env = catdog_env(snapshot, work / f"prefect-x{factor}")
    log(f"x{factor}: {' '.join(command[1:])}")
    run, summary = measure_catdog(
        command, work / "logs" / f"x{factor}.log", artifacts, timeout=args.timeout, env=env
    )
    keep_logs(work, f"x{factor}")
    entry: dict[str, Any] = {"factor": factor, "run": run.to_json()}
    if summary:
        counts = summary["data"]["counts"]
        entry.update(
            images=summary["data"]["images"],
            train_images=sum(counts["train"].values()),
            counts=counts,
            split_hash=summary["data"]["split_hash"],
            stage_seconds=summary.get("stage_seconds", {}),
            disk_bytes=summary.get("disk_bytes", {}),
            models={
                name: {
                    "val_acc": model["history"]["val_accuracy"][-1],
                    "test_acc": model["test_accuracy"],
                    "epoch_seconds": model["epoch_seconds"],
                }
                for name, model in summary["models"].items()
            },
        )
    shutil.rmtree(artifacts, ignore_errors=True)
    return entry


def render(data: dict[str, Any]) -> str:
    sizes = data["sizes"]
    stages = sorted({stage for s in sizes for stage in s.get("stage_seconds", {})})
    header = ["dataset", "images (train)", "peak memory", "wall", "wall / train image"]
    header += [f"{stage} / train image" for stage in stages]
    header += ["artifacts on disk", "model1 val acc", "model4 val acc"]
    rows = []
    for size in sizes:
        run = size["run"]
        n = size.get("train_images")
        if not n:
            rows.append([f"{size['factor']}x", "failed: " + str(run["error"])])
            continue
        per = {s: seconds / n * 1000 for s, seconds in size["stage_seconds"].items()}
        models = size["models"]
        rows.append(
            [
                f"{size['factor']}x",
                f"{size['images']:,} ({n:,})",
                fmt_gib(run["peak_bytes"]),
                f"{run['wall_seconds']:.0f} s",
                f"{run['wall_seconds'] / n * 1000:.1f} ms",
                *[f"{per[s]:.2f} ms" if s in per else "" for s in stages],
                f"{size['disk_bytes'].get('total', 0) / 1e9:.2f} GB",
                *[
                    f"{100 * models[m]['val_acc']:.1f}%" if m in models else ""
                    for m in ("model1", "model4")
                ],
            ]
        )
    lines = [
        f"## Scale: the dataset at {', '.join(str(s['factor']) + 'x' for s in sizes)} "
        f"({data['started']})",
        "",
        environment_markdown({**data["environment"], "command": f"`{data['command']}`"}),
        "",
        f"`--models {MODELS} --epochs {data['epochs']} --seed {data['seed']}` on fresh "
        "artifacts per size, each run in its own process. Extra images are deterministic "
        "crops, flips and colour jitters of real ones (same split and class), re-encoded as "
        "JPEG. Peak memory is the larger of the run's ru_maxrss and the sampled sum of its "
        "process tree's RSS. Stage seconds are the stages' own (summary.json "
        "`stage_seconds`); wall includes Prefect's start-up, the manifest's hashing, "
        "plots, evaluation and the report. Disk is summary.json's `disk_bytes` (every stage "
        "output the run used, the images' copy included).",
        "",
        table(header, rows),
    ]
    done = [s for s in sizes if s.get("train_images")]
    if len(done) >= 2:
        first, last = done[0], done[-1]
        growth = ratio(last["run"]["peak_bytes"], first["run"]["peak_bytes"])
        per_first = first["run"]["wall_seconds"] / first["train_images"]
        per_last = last["run"]["wall_seconds"] / last["train_images"]
        growth_ok = growth is not None and growth <= 1.15 and last["run"]["peak_bytes"] < 3e9
        checks = [
            [
                f"peak memory {last['factor']}x / {first['factor']}x ≤ 1.15, under 3 GB at "
                f"{last['factor']}x",
                f"{fmt(growth, 3)}x ({fmt_gib(last['run']['peak_bytes'])})",
                verdict(growth_ok),
            ],
            [
                f"wall per training image, {last['factor']}x no worse than {first['factor']}x",
                f"{per_last * 1000:.1f} ms against {per_first * 1000:.1f} ms "
                f"({fmt(ratio(per_last, per_first), 3)}x)",
                verdict(per_last <= per_first * 1.05),
            ],
        ]
        lines += ["", "### Targets", "", table(["target", "measured", "verdict"], checks)]
    others = [s["run"].get("others_cores") for s in sizes]
    lines += [
        "",
        "Other processes' CPU during each run (cores): " + ", ".join(fmt(o, 2) for o in others),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    resolve_inputs(args)
    factors = [int(f) for f in args.factors.split(",")]
    work = args.workdir or Path(tempfile.gettempdir()) / "catdog-scale"
    work.mkdir(parents=True, exist_ok=True)
    snapshot_dir = Path(tempfile.mkdtemp(prefix="catdog-scale-src-"))
    snapshot = snapshot_sources(snapshot_dir / "src")
    raw = RawLog(args.out.with_suffix(f".{args.section}.json"))
    raw.data.update(
        started=now(),
        epochs=args.epochs,
        seed=args.seed,
        command=command_line(),
        environment={**snapshot_facts(snapshot), "CPU flags": bf16_flags()},
        sizes=[],
    )
    real = real_images(args.data, work)
    for factor in factors:
        log(f"building the {factor}x dataset")
        data = enlarged(real, factor, work)
        raw.data["sizes"].append(measure_size(args, factor, data, work, Path(snapshot["path"])))
        raw.save()
        write_section(args.out, args.section, render(raw.data), TITLE)
    shutil.rmtree(snapshot_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
