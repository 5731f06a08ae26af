"""How far apart are copies, and how far apart are different images? The near-duplicate
threshold, chosen by measurement on the real dataset, and what it finds there.

For a sample of the real images, copies are made the ways a dataset gets them: resized to half
and to a quarter, re-encoded at JPEG quality 50, cropped by 5% on every side, and all of these at
once. The pHash and dHash distance from each copy to its original is set against each image's
distance to its nearest *other* image in the dataset. Then the chosen threshold
(`catdog.data.quality.NEAR_DUPLICATE_BITS`) is applied to the whole dataset: the groups it finds,
how many straddle the dataset's own train/ and validation/ folders, and how long a pass takes.

    .venv/bin/python bench/studies/near_duplicates.py [--data ZIP] [--sample 300]

Writes section `near-duplicates` of bench/RESULTS.md and RESULTS.near-duplicates.json (the
distances as histograms: how many images or copies lie at each bit distance).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

# The repository root on the path: `bench` imports as a package, whichever script runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import (
    BENCH,
    SHARED,
    environment_markdown,
    extracted_dataset,
    log,
    run_facts,
    table,
    write_section,
)
from catdog.data.quality import (
    NEAR_DUPLICATE_BITS,
    centre_hashes,
    inspect_images,
    near_duplicate_groups,
    perceptual_hash,
)

VARIANTS = ("half size", "quarter size", "JPEG q50", "crop 5%", "all three")


def difference_hash(image: Image.Image) -> int:
    gray = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=float)
    bits = (gray[:, 1:] > gray[:, :-1]).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def _reencode(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def variants(image: Image.Image) -> dict[str, Image.Image]:
    w, h = image.size
    crop = image.crop((w // 20, h // 20, w - w // 20, h - h // 20))
    return {
        "half size": image.resize((w // 2, h // 2)),
        "quarter size": image.resize((w // 4, h // 4)),
        "JPEG q50": _reencode(image, 50),
        "crop 5%": crop,
        "all three": _reencode(crop.resize((w // 2, h // 2)), 50),
    }


def histogram(distances: np.ndarray | list[int]) -> dict[str, int]:
    """How many of `distances` lie at each bit distance: every figure of the section's table
    comes back from it, in a few dozen numbers instead of one per image."""
    values, counts = np.unique(np.asarray(distances, dtype=int), return_counts=True)
    return {str(value): int(count) for value, count in zip(values, counts, strict=True)}


def popcount_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distances between every hash of `a` and every hash of `b` (uint64 arrays)."""
    xor = (a[:, None] ^ b[None, :]).view(np.uint8).reshape(len(a), len(b), 8)
    return np.unpackbits(xor, axis=2).sum(axis=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "cats_and_dogs_filtered.zip")
    parser.add_argument("--sample", type=int, default=300, help="originals copied")
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args()

    with extracted_dataset(args.data) as manifest:
        root = Path(manifest.root)
        paths = [entry.path for entry in manifest.images]
        started = time.perf_counter()
        inspection = inspect_images(root, paths)
        inspect_seconds = time.perf_counter() - started
        log(f"inspected {len(paths)} images in {inspect_seconds:.1f} s")

        dhashes = []
        for path in paths:
            with Image.open(root / path) as image:
                dhashes.append(difference_hash(image.convert("RGB")))
        hashes = {
            "pHash": inspection.hashes[:, 0],
            "dHash": np.array(dhashes, dtype=np.uint64),
            "pHash + centres": inspection.hashes,
        }

        rng = np.random.default_rng(0)
        sample = sorted(rng.choice(len(paths), size=min(args.sample, len(paths)), replace=False))
        copies: dict[str, dict[str, list[int]]] = {
            name: {v: [] for v in VARIANTS} for name in hashes
        }
        for i in sample:
            with Image.open(root / paths[i]) as image:
                original = image.convert("RGB")
            for variant, copy in variants(original).items():
                copies["pHash"][variant].append(
                    (perceptual_hash(copy) ^ int(hashes["pHash"][i])).bit_count()
                )
                copies["dHash"][variant].append(
                    (difference_hash(copy) ^ int(hashes["dHash"][i])).bit_count()
                )
                copy_rows = centre_hashes(copy)
                original = [int(h) for h in inspection.hashes[i]]
                copies["pHash + centres"][variant].append(
                    min(
                        min((h ^ copy_rows[0]).bit_count() for h in original),
                        min((original[0] ^ h).bit_count() for h in copy_rows),
                    )
                )

        nearest: dict[str, np.ndarray] = {}
        for name, values in hashes.items():
            rows = values.reshape(len(values), -1)
            whole = rows[:, 0]
            distances = np.full((len(whole), len(whole)), 64)
            for scale in range(rows.shape[1]):
                one = np.concatenate(
                    [
                        popcount_matrix(rows[start : start + 250, scale], whole)
                        for start in range(0, len(whole), 250)
                    ]
                )
                distances = np.minimum(distances, np.minimum(one, one.T))
            np.fill_diagonal(distances, 64)
            nearest[name] = distances.min(axis=1)

    rows = []
    for name in hashes:
        for variant in VARIANTS:
            values = np.array(copies[name][variant])
            rows.append(
                [
                    name,
                    f"copy: {variant}",
                    f"{np.median(values):.0f}",
                    f"{np.percentile(values, 99):.0f}",
                    f"{values.max()}",
                    f"{(values <= NEAR_DUPLICATE_BITS).mean():.1%}",
                ]
            )
        values = nearest[name]
        rows.append(
            [
                name,
                "nearest other image",
                f"{np.median(values):.0f}",
                f"{np.percentile(values, 1):.0f} (1st pct)",
                f"{values.min()} (min)",
                f"{(values <= NEAR_DUPLICATE_BITS).mean():.1%}",
            ]
        )

    groups = near_duplicate_groups(inspection.hashes, NEAR_DUPLICATE_BITS)
    by_path = {entry.path: entry for entry in manifest.images}
    described = []
    straddling = 0
    cross_class = 0
    for group in groups:
        members = [paths[i] for i in group]
        folders = {by_path[p].source_split for p in members}
        classes = {by_path[p].class_name for p in members}
        straddling += len(folders) > 1
        cross_class += len(classes) > 1
        bits = max(
            (int(inspection.hashes[a, 0]) ^ int(inspection.hashes[b, 0])).bit_count()
            for a in group
            for b in group
        )
        described.append({"paths": members, "max_bits": bits})

    raw = {
        "threshold_bits": NEAR_DUPLICATE_BITS,
        "images": len(paths),
        "inspect_seconds": inspect_seconds,
        "copies": {
            name: {variant: histogram(values) for variant, values in by_variant.items()}
            for name, by_variant in copies.items()
        },
        "distinct_within": {
            name: {str(t): int((values <= t).sum()) for t in range(0, 17)}
            for name, values in nearest.items()
        },
        "nearest_other": {name: histogram(values) for name, values in nearest.items()},
        "groups": described,
        "straddling_train_validation": straddling,
        "cross_class": cross_class,
    }
    (args.out.parent / "RESULTS.near-duplicates.json").write_text(json.dumps(raw, indent=1) + "\n")

    facts = run_facts()
    body = "\n".join(
        [
            f"## Near-duplicates: the threshold, measured ({facts['date']})",
            "",
            f"`{facts['command']}` on {args.data.name} ({len(paths)} usable images).",
            "",
            f"Bit distances (of 64) from {len(sample)} sampled images to their copies, and from "
            "every image to its nearest other image; the last column is the share within the "
            f"chosen threshold, {NEAR_DUPLICATE_BITS} bits:",
            "",
            table(
                [
                    "hash",
                    "pair",
                    "median",
                    "99th pct / 1st pct",
                    "max / min",
                    f"<= {NEAR_DUPLICATE_BITS}",
                ],
                rows,
            ),
            "",
            f"catdog links two images when one's whole-image pHash is within "
            f"{NEAR_DUPLICATE_BITS} bits of the other's pHash of the whole image or of a centre "
            f"(pHash + centres). At {NEAR_DUPLICATE_BITS} bits the dataset holds "
            f"**{len(groups)} near-duplicate groups** ({sum(len(g) for g in groups)} images); "
            f"**{straddling}** straddle its own "
            f"train/ and validation/ folders, {cross_class} hold both classes. One pass over "
            f"every image (properties and hash) took {inspect_seconds:.1f} s.",
            "",
            *(
                f"- {', '.join(f'`{p}`' for p in group['paths'])} ({group['max_bits']} bits)"
                for group in described
            ),
            "",
            environment_markdown({"CPU flags": facts["bf16_flags"], "commit": facts["commit"]}),
        ]
    )
    write_section(args.out, "near-duplicates", body, "Near-duplicates: the threshold, measured")
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
