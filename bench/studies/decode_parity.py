"""catdog's decoded pixels against the blog's loader, on the real dataset: how close, how sharp,
how fast.

    python bench/studies/decode_parity.py --section decode-parity

For every image of the archive, at the blog's side (160) and model4's (224), three decoders:
- "blog": `image_dataset_from_directory` (TensorFlow decodes the JPEG, then `tf.image.resize`,
  bilinear, no antialiasing), read once in file order;
- "catdog": `catdog.data.images.load_images`, what the decode stage runs;
- "averaging": the decoder catdog used before (the JPEG decoded at a reduced scale, then
  Pillow's `resize`, which averages over each output pixel's footprint), kept here as the
  reference it was replaced against.

Reported per decoder: the mean and the 99.9th percentile of |pixel - blog's pixel| (JPEG
decoders round differently, so a few levels apart is expected), fine detail as the mean absolute
Laplacian relative to the blog's images (below 1: blurrier), and seconds per image. The three
are timed alternately, `--repeats` rounds, in this one process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
from PIL import Image

# The repository root on the path: `bench` imports as a package, whichever script runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.blog_recipe import extract_zip
from bench.common import (
    BENCH,
    RawLog,
    _git,
    add_input_arguments,
    command_line,
    environment_markdown,
    fmt,
    log,
    now,
    table,
    write_section,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
DECODERS = ("blog", "catdog", "averaging")


def _averaging_image(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (size, size))
        rgb = image.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)


def _averaging(paths: list[Path], size: int) -> np.ndarray:
    from concurrent.futures import ThreadPoolExecutor

    from catdog.data.images import _workers

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def fill(index: int) -> None:
        out[index] = _averaging_image(paths[index], size)

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        list(pool.map(fill, range(len(paths))))
    return out


def _blog(root: Path, size: int) -> tuple[list[Path], np.ndarray]:
    import keras

    dataset = keras.utils.image_dataset_from_directory(
        root, image_size=(size, size), shuffle=False, batch_size=256, verbose=False
    )
    images = np.concatenate([batch.numpy() for batch, _ in dataset])
    return [Path(p) for p in dataset.file_paths], images


def _laplacian(images: np.ndarray) -> float:
    gray = images.astype(np.float32).mean(axis=-1)
    centre = gray[:, 1:-1, 1:-1]
    neighbours = gray[:, :-2, 1:-1] + gray[:, 2:, 1:-1] + gray[:, 1:-1, :-2] + gray[:, 1:-1, 2:]
    return float(np.abs(4 * centre - neighbours).mean())


def measure(root: Path, sizes: list[int], repeats: int) -> dict[str, Any]:
    from catdog.data.images import load_images

    results: dict[str, Any] = {}
    for size in sizes:
        seconds: dict[str, list[float]] = {name: [] for name in DECODERS}
        images: dict[str, np.ndarray] = {}
        paths: list[Path] = []
        for round_index in range(repeats):
            order = DECODERS if round_index % 2 == 0 else tuple(reversed(DECODERS))
            for name in order:
                started = time.perf_counter()
                if name == "blog":
                    paths, decoded = _blog(root, size)
                elif name == "catdog":  # `paths`: the blog's order, set in round 1 (blog first)
                    decoded = load_images(paths, size)
                else:
                    decoded = _averaging(paths, size)
                seconds[name].append(time.perf_counter() - started)
                images[name] = decoded
                log(f"{size}px round {round_index + 1} {name}: {seconds[name][-1]:.1f} s")
        blog = images["blog"].astype(np.float32)
        blog_detail = _laplacian(images["blog"])
        per_decoder = {}
        for name in DECODERS:
            diff = np.abs(images[name].astype(np.float32) - blog)
            per_decoder[name] = {
                "seconds": seconds[name],
                "seconds_per_image": median(seconds[name]) / len(paths),
                "mean_abs_diff": float(diff.mean()),
                "p999_abs_diff": float(np.percentile(diff, 99.9)),
                "detail_ratio": _laplacian(images[name]) / blog_detail,
            }
        results[str(size)] = {"images": len(paths), "decoders": per_decoder}
    return results


def render(data: dict[str, Any]) -> str:
    rows = []
    for size, result in data["results"].items():
        catdog_seconds = result["decoders"]["catdog"]["seconds_per_image"]
        for name in DECODERS:
            figures = result["decoders"][name]
            rows.append(
                [
                    f"{size}x{size}",
                    name,
                    str(result["images"]),
                    fmt(figures["mean_abs_diff"], 2),
                    fmt(figures["p999_abs_diff"], 1),
                    fmt(figures["detail_ratio"], 2),
                    fmt(figures["seconds_per_image"] * 1000, 2, " ms"),
                    fmt(figures["seconds_per_image"] / catdog_seconds, 2, "x"),
                ]
            )
    header = [
        "side",
        "decoder",
        "images",
        "mean abs diff vs blog",
        "99.9th pct abs diff",
        "fine detail vs blog",
        "time per image (median)",
        "time vs catdog",
    ]
    return "\n\n".join(
        [
            f"## Decoded pixels against the blog's loader ({data['finished']})",
            environment_markdown({"command": f"`{data['command']}`", "git": data["git"]}),
            f"Every image of the archive, {data['repeats']} rounds alternating the decoders. "
            "Differences are in 0..255 levels. Fine detail is the mean absolute Laplacian over the "
            "blog's. The blog's time includes batching into tensors; catdog's and the "
            "averaging decoder's use the decode stage's threads.",
            table(header, rows),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_input_arguments(parser)
    parser.add_argument("--sizes", default="160,224")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--section", default="decode-parity")
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args()

    git = _git("rev-parse", "--short=10", "HEAD")
    with tempfile.TemporaryDirectory(prefix="catdog-decode-") as work:
        root = extract_zip(args.data, Path(work))
        results = measure(root, [int(s) for s in args.sizes.split(",")], args.repeats)
    data = {
        "finished": now(),
        "command": command_line(),
        "git": git,
        "repeats": args.repeats,
        "results": results,
    }
    RawLog(args.out.with_name(f"{args.out.stem}.{args.section}.json"), data).save()
    write_section(args.out, args.section, render(data), "catdog benchmark results")
    log(f"wrote section {args.section!r} of {args.out}")


if __name__ == "__main__":
    main()
