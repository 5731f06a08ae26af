"""False alarms and findings of the data checks on the real dataset.

1. False alarms. The real dataset's images, pooled per class, are split as a folder of class
   folders would be (70/15/15) under seed 0 (the reference, as if production had trained on
   it) and under 20 other seeds; each seed's training split is checked against the
   reference's with the flow's thresholds. Overlapping samples make that lenient, so the same
   is done for two disjoint halves of every class under 20 seeds: the strictest same-source
   comparison there is.
2. Suspect labels. The probe's lowest out-of-fold probabilities on the real training split
   (features of model4's MobileNetV2 base at 224x224, ImageNet weights), and, with a fifth of
   the training cats filed under dogs, how many of those come out on top.

    .venv/bin/python bench/studies/data_checks.py [--data ZIP] [--weights H5]

Writes section `data-checks` of bench/RESULTS.md and RESULTS.data-checks.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# The repository root on the path: `bench` imports as a package, whichever script runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import (
    BENCH,
    SHARED,
    bf16_flags,
    environment_markdown,
    extracted_dataset,
    log,
    run_facts,
    table,
    write_section,
)
from catdog.data import probe, quality

SEEDS = 20
SIZE = 224


def features_of(root: Path, paths: list[str], weights: Path) -> np.ndarray:
    """Pooled features of model4's frozen base, as `extract_features` computes view 0."""
    from catdog import models
    from catdog.data.images import load_image

    model = models.build_model("model4", (SIZE, SIZE, 3), 2, weights=str(weights), seed=0)
    extractor = models.feature_extractor(model)
    rows = []
    for start in range(0, len(paths), 64):
        batch = np.stack([load_image(root / p, SIZE) for p in paths[start : start + 64]])
        rows.append(np.asarray(extractor.predict_on_batch(batch.astype(np.float32))))
    return np.concatenate(rows)


def checks(
    reference: np.ndarray,
    current: np.ndarray,
    values: np.ndarray,
    labels: np.ndarray,
    features: np.ndarray,
    seed: int,
) -> dict[str, bool]:
    """Every check of the flow, the training rows `reference` against `current`."""

    def counts(rows: np.ndarray) -> dict[str, int]:
        return {str(c): int((labels[rows] == c).sum()) for c in (0, 1)}

    verdicts = {"class_balance": quality.class_balance(counts(reference), counts(current)).passed}
    for k, name in enumerate(quality.PROPERTIES):
        verdicts[f"property:{name}"] = quality.property_drift(
            name, values[reference, k], values[current, k]
        ).passed
    sample_a = quality.sample_rows(features[reference], quality.EMBEDDING_SAMPLE, seed)
    sample_b = quality.sample_rows(features[current], quality.EMBEDDING_SAMPLE, seed + 1)
    verdicts["embeddings"] = quality.embedding_drift(sample_a, sample_b, seed=seed).passed
    return verdicts


def flat_train(labels: np.ndarray, seed: int) -> np.ndarray:
    """The training rows of a 70/15/15 split per class under `seed`."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == c))
        rows.append(members[: round(0.7 * len(members))])
    return np.sort(np.concatenate(rows))


def halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a, b = [], []
    for c in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == c))
        a.append(members[: len(members) // 2])
        b.append(members[len(members) // 2 :])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "cats_and_dogs_filtered.zip")
    parser.add_argument(
        "--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args()

    with extracted_dataset(args.data) as manifest:
        root = Path(manifest.root)
        paths = [entry.path for entry in manifest.images]
        labels = np.array([entry.label for entry in manifest.images])
        values = quality.inspect_images(root, paths).values
        started = time.perf_counter()
        features = features_of(root, paths, args.weights)
        log(f"features of {len(paths)} images in {time.perf_counter() - started:.0f} s")

    names = ["class_balance", *(f"property:{n}" for n in quality.PROPERTIES), "embeddings"]
    reference = flat_train(labels, 0)
    resplit = [
        checks(reference, flat_train(labels, s), values, labels, features, s)
        for s in range(1, SEEDS + 1)
    ]
    disjoint = [
        checks(*halves(labels, s), values, labels, features, s) for s in range(1, SEEDS + 1)
    ]
    started = time.perf_counter()
    checks(reference, flat_train(labels, 1), values, labels, features, 1)
    check_seconds = time.perf_counter() - started

    train = np.flatnonzero([entry.source_split == "train" for entry in manifest.images])
    started = time.perf_counter()
    probability = probe.out_of_fold_label_probability(features[train], labels[train], 2)
    probe_seconds = time.perf_counter() - started
    order = np.argsort(probability)
    suspects = [
        {
            "path": paths[train[i]],
            "label": manifest.classes[labels[train[i]]],
            "probability": round(float(probability[i]), 4),
        }
        for i in order[:20]
    ]
    rng = np.random.default_rng(0)
    cats = np.flatnonzero(labels[train] == 0)
    moved = rng.choice(cats, len(cats) // 5, replace=False)
    given = labels[train].copy()
    given[moved] = 1
    moved_probability = probe.out_of_fold_label_probability(features[train], given, 2)
    ranked = np.argsort(moved_probability)
    found = {k: len(set(ranked[:k]) & set(moved)) for k in (len(moved), 2 * len(moved))}

    rows = []
    for name in names:
        rows.append(
            [
                name,
                f"{sum(r[name] for r in resplit)}/{SEEDS}",
                f"{sum(r[name] for r in disjoint)}/{SEEDS}",
            ]
        )
    all_pass = [sum(all(r.values()) for r in runs) for runs in (resplit, disjoint)]
    rows.append(["every check at once", f"{all_pass[0]}/{SEEDS}", f"{all_pass[1]}/{SEEDS}"])
    raw = {
        "resplit": resplit,
        "disjoint": disjoint,
        "suspects": suspects,
        "moved": len(moved),
        "moved_found": found,
        "check_seconds": check_seconds,
        "probe_seconds": probe_seconds,
        "cpu": bf16_flags(),
    }
    (args.out.parent / "RESULTS.data-checks.json").write_text(json.dumps(raw, indent=1) + "\n")
    facts = run_facts()
    body = "\n".join(
        [
            f"## Data checks: false alarms and suspect labels ({facts['date']})",
            "",
            f"`{facts['command']}` on {args.data.name} ({len(paths)} images), features of "
            f"model4's base at {SIZE}x{SIZE} with ImageNet weights.",
            "",
            "Checks passed, at the flow's thresholds (shares move > "
            f"{quality.MAX_SHARE_CHANGE:g} with chi-square p < {quality.SIGNIFICANCE:g}; "
            f"Kolmogorov-Smirnov distance > {quality.MAX_KS_DISTANCE:g} with p < "
            f"{quality.SIGNIFICANCE:g}; MMD² above its permutation null's "
            f"{1 - quality.EMBEDDING_SIGNIFICANCE:.0%} quantile), when nothing changed but the "
            "sample:",
            "",
            table(
                [
                    "check",
                    "training split of seed 1..20 vs seed 0 (70/15/15)",
                    "two disjoint halves, 20 seeds",
                ],
                rows,
            ),
            "",
            f"All checks of one comparison took {check_seconds:.2f} s; the probe over "
            f"{len(train)} training images {probe_seconds:.2f} s.",
            "",
            f"Suspect labels: with {len(moved)} training cats (a fifth) filed under dogs, "
            f"{found[len(moved)]} of them are among the {len(moved)} lowest probabilities and "
            f"{found[2 * len(moved)]} among the lowest {2 * len(moved)}. The real training "
            "split's lowest, as filed:",
            "",
            table(
                ["path", "label", "probability"],
                [[f"`{s['path']}`", s["label"], f"{s['probability']:.4f}"] for s in suspects],
            ),
            "",
            environment_markdown({"CPU flags": facts["bf16_flags"], "commit": facts["commit"]}),
        ]
    )
    write_section(args.out, "data-checks", body, "Data checks: false alarms and findings")
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
