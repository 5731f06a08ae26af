"""Where an epoch of model2 and model3 goes, with Keras's layers (before) and catdog's (after).

    .venv/bin/python bench/studies/epoch_profile.py [--rounds 3]

"before" is each model with the built-in layers catdog's stand for: `RandomFlip` then
`RandomRotation` for the augmentation, `BatchNormalization` for model2's normalization;
"after" is the model as catdog builds it (`catdog.layers`); "pipeline" is "after" with its
augmentation moved out of the model into the input pipeline (`Dataset.map` with two parallel
calls), where Keras recommends it for CPU training, so that it overlaps the training step
(flips and rotations commute with model3's per-pixel scaling). All train on the real training
split (2,000 images at 160x160, validation on 800) through catdog's input pipeline under the
precision `auto` picks here, in one process: a warm-up epoch each, then `--rounds` timed epochs
each, the variants alternating. One more epoch of each runs under TensorFlow's profiler; its
op time is summed by what the ops belong to (milliseconds of CPU per training step, every
thread together), next to the step's wall time.

Writes section `epoch-profile` of bench/RESULTS.md and RESULTS.epoch-profile.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The repository root on the path: `bench` imports as a package, whichever script runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import keras
import tensorflow as tf

from bench.common import (
    BENCH,
    SHARED,
    bf16_flags,
    command_line,
    environment_markdown,
    extracted_dataset,
    log,
    now,
    table,
    write_section,
)
from catdog import layers, models
from catdog.data.images import decode_split
from catdog.data.split import split_manifest
from catdog.training import dtype_policy, image_dataset

MODELS = ("model2", "model3")
VARIANTS = ("before", "after", "pipeline")
SEED = 1337
SIZE = 160
BATCH = 32
CATEGORIES = (
    "augmentation",
    "batch normalization",
    "convolutions",
    "other layers and loss",
    "optimizer",
    "input pipeline",
)


def with_keras_layers(model: keras.Sequential) -> keras.Sequential:
    """`model` with Keras's built-in layers where catdog's stand for them (same seeds)."""
    replaced = []
    for layer in model.layers:
        if isinstance(layer, layers.RandomFlipAndRotation):
            layer = keras.Sequential(
                [
                    keras.layers.RandomFlip("horizontal", seed=layers.sub_seed(layer.seed, 0)),
                    keras.layers.RandomRotation(layer.factor, seed=layers.sub_seed(layer.seed, 1)),
                ],
                name=layer.name,
            )
        elif isinstance(layer, layers.FusedBatchNormalization):
            layer = keras.layers.BatchNormalization(name=layer.name)
        replaced.append(layer)
    return keras.Sequential([keras.Input((SIZE, SIZE, 3)), *replaced], name=model.name)


def without_augmentation(model: keras.Sequential) -> keras.Sequential:
    """`model`'s other layers (shared, not copied), for batches augmented beforehand."""
    rest = [layer for layer in model.layers if layer.name != models.AUGMENTATION_LAYER_NAME]
    return keras.Sequential([keras.Input((SIZE, SIZE, 3)), *rest], name=model.name)


def category(name: str, op_type: str, thread: str) -> str | None:
    """What an op event belongs to, from its name path and type; None for wrappers."""
    if op_type.endswith("PartitionedCall") or name.startswith("__inference"):
        return None
    if thread.startswith("tf_data"):
        return "input pipeline"
    parts = name.split("/")
    if any("augmentation" in part for part in parts):
        return "augmentation"
    in_bn_layer = any(part.startswith("bn") and part[2:3].isdigit() for part in parts)
    if "BatchNorm" in op_type or in_bn_layer:
        return "batch normalization"
    if "Conv2D" in op_type:
        return "convolutions"
    if parts[0].startswith("adam") or "/adam" in name:
        return "optimizer"
    return "other layers and loss"


def profile_epoch(model: keras.Model, train: tf.data.Dataset, val: tf.data.Dataset) -> dict:
    """One epoch under the profiler: CPU milliseconds per step by category, and the wall."""
    folder = Path(tempfile.mkdtemp(prefix="catdog-profile-"))
    try:
        tf.profiler.experimental.start(str(folder))
        started = time.perf_counter()
        model.fit(train, validation_data=val, epochs=1, verbose=0)
        wall = time.perf_counter() - started
        tf.profiler.experimental.stop()
        from tensorflow.tsl.profiler.protobuf import xplane_pb2

        space = xplane_pb2.XSpace()
        space.ParseFromString(next(folder.rglob("*.xplane.pb")).read_bytes())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    totals: collections.Counter[str] = collections.Counter()
    for plane in space.planes:
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "")
                # Kernel events are "op name:OpType"; runtime wrappers use "::" or ": ".
                if name.count(":") != 1 or ": " in name:
                    continue
                op_name, op_type = name.split(":")
                kind = category(op_name, op_type, line.name)
                if kind:
                    totals[kind] += event.duration_ps / 1e9  # milliseconds
    steps = len(train)
    return {
        "wall_ms_per_step": wall * 1000 / steps,
        "cpu_ms_per_step": {kind: totals[kind] / steps for kind in CATEGORIES},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "cats_and_dogs_filtered.zip")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per variant")
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    parser.add_argument(
        "--from-json", type=Path, help="re-render the section from an earlier run's raw JSON"
    )
    args = parser.parse_args()
    if args.from_json:
        raw = json.loads(args.from_json.read_text())
        rounds = len(next(iter(raw["epochs"].values())))
        write_section(args.out, "epoch-profile", render(raw, rounds), "epoch-profile")
        return 0

    with extracted_dataset(args.data) as manifest:
        split = split_manifest(manifest, seed=SEED)
        x_train, y_train = decode_split(split, "train", SIZE)
        x_val, y_val = decode_split(split, "validation", SIZE)
    train = image_dataset(x_train, y_train, BATCH, shuffle=True, seed=SEED)
    val = image_dataset(x_val, y_val, BATCH, shuffle=False, seed=SEED)

    built: dict[tuple[str, str], keras.Model] = {}
    inputs: dict[tuple[str, str], tf.data.Dataset] = {}
    policies = {}
    for name in MODELS:
        with dtype_policy("auto", name) as policy:
            policies[name] = policy
            after = models.build_model(name, (SIZE, SIZE, 3), 2, weights=None, seed=SEED)
            before = with_keras_layers(
                models.build_model(name, (SIZE, SIZE, 3), 2, weights=None, seed=SEED)
            )
            pipeline = models.build_model(name, (SIZE, SIZE, 3), 2, weights=None, seed=SEED)
            augment = models.get_augmentation(pipeline)
            inputs[name, "pipeline"] = train.map(
                lambda x, y, augment=augment: (augment(x, training=True), y),
                num_parallel_calls=2,
                deterministic=True,
            ).prefetch(2)
        trained = {"before": before, "after": after, "pipeline": without_augmentation(pipeline)}
        for variant, model in trained.items():
            built[name, variant] = models.compile_model(model)
            inputs.setdefault((name, variant), train)
            log(f"{name} {variant}: warm-up epoch")
            model.fit(inputs[name, variant], validation_data=val, epochs=1, verbose=0)

    epochs: dict[str, list[dict[str, float]]] = {f"{m} {v}": [] for m, v in built}
    for round_index in range(args.rounds):
        order = list(built) if round_index % 2 == 0 else list(reversed(built))
        for name, variant in order:
            cpu, started = time.process_time(), time.perf_counter()
            model, batches = built[name, variant], inputs[name, variant]
            model.fit(batches, validation_data=val, epochs=1, verbose=0)
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            epochs[f"{name} {variant}"].append({"wall": wall, "cpu": cpu})
            log(f"round {round_index + 1}: {name} {variant} {wall:.2f} s ({cpu:.1f} s CPU)")

    profiles = {}
    for name, variant in built:
        log(f"{name} {variant}: profiled epoch")
        profiles[f"{name} {variant}"] = profile_epoch(
            built[name, variant], inputs[name, variant], val
        )

    started = time.perf_counter()
    for _ in train:
        pass
    pipeline_alone = time.perf_counter() - started

    raw = {
        "epochs": epochs,
        "profiles": profiles,
        "policies": policies,
        "input_pipeline_alone_seconds": pipeline_alone,
        "cpu": bf16_flags(),
        "finished": now(),
        "command": command_line(),
        "git": subprocess.run(
            ["git", "-C", str(BENCH.parent), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
    }
    args.out.with_name("RESULTS.epoch-profile.json").write_text(json.dumps(raw, indent=1) + "\n")
    write_section(args.out, "epoch-profile", render(raw, args.rounds), "epoch-profile")
    return 0


def render(raw: dict[str, Any], rounds: int) -> str:
    """The Markdown section."""
    rows, verdicts = [], []
    for name in MODELS:
        median, cpu = {}, {}
        for variant in VARIANTS:
            runs = raw["epochs"][f"{name} {variant}"]
            walls = [run["wall"] for run in runs]
            median[variant] = statistics.median(walls)
            cpu[variant] = statistics.median(run["cpu"] for run in runs)
            rows.append(
                [
                    name,
                    variant,
                    raw["policies"][name],
                    f"{median[variant]:.2f} s",
                    f"{min(walls):.2f} s",
                    f"{cpu[variant]:.1f} s",
                ]
            )
        verdicts.append(
            f"- {name}: after / before = **{median['after'] / median['before']:.3f}x** "
            f"the median epoch ({median['before']:.2f} s → {median['after']:.2f} s), "
            f"**{cpu['after'] / cpu['before']:.3f}x** its CPU time ({cpu['before']:.1f} s → "
            f"{cpu['after']:.1f} s); pipeline / after = {median['pipeline'] / median['after']:.3f}x"
            f" the epoch, {cpu['pipeline'] / cpu['after']:.3f}x the CPU time"
        )
    profile_rows = []
    for key, profile in raw["profiles"].items():
        cpu = profile["cpu_ms_per_step"]
        profile_rows.append(
            [
                key,
                f"{profile['wall_ms_per_step']:.0f}",
                *(f"{cpu[kind]:.1f}" for kind in CATEGORIES),
                f"{sum(cpu.values()):.0f}",
            ]
        )
    return "\n".join(
        [
            "## One epoch of model2 and model3: Keras's layers against catdog's "
            f"({raw.get('finished') or now()})",
            "",
            environment_markdown(
                {
                    "catdog sources": f"the checkout, {raw['git']}",
                    "command": f"`{raw['command']}`",
                    "CPU flags": raw["cpu"],
                }
            ),
            "",
            "before: RandomFlip + RandomRotation (and BatchNormalization in model2); after: "
            "`catdog.layers.RandomFlipAndRotation` (and `FusedBatchNormalization`); pipeline: "
            "after, with the augmentation run by the input pipeline (two parallel calls). Real "
            "training split, 2,000 images at 160x160, batch 32, validation on 800 each epoch, "
            f"one process; {rounds} timed epochs per variant after a warm-up epoch, the "
            "variants alternating. Every variant reads catdog's input pipeline, which runs "
            "without tf.data autotuning: before it did, about one epoch in two stood idle "
            "for 3-4 s at its first step (epochs of 5.1 s or 10.2 s), while Keras dropped the "
            "previous epoch's iterator and the iterator's tuning thread slept out its period.",
            "",
            table(["model", "variant", "policy", "epoch (median)", "epoch (fastest)", "CPU"], rows),
            "",
            *verdicts,
            "",
            "### Profile of one epoch (ms of CPU per training step, all threads)",
            "",
            table(["run", "wall ms/step", *CATEGORIES, "sum"], profile_rows),
            "",
            "The input pipeline alone (reading and casting the batches of one epoch, no "
            f"training): {raw['input_pipeline_alone_seconds']:.2f} s.",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
