"""Export a trained model for serving, and check every export in a fresh process.

An export is a folder: a TensorFlow SavedModel (`saved_model/`, servable by TensorFlow
Serving), a LiteRT model (`model.tflite`, run by `ai-edge-litert` without TensorFlow) and
`serving.json` (input, output, class names; see `catdog.serving`). Both compute in float32 and
end in class probabilities: a model trained under mixed_bfloat16 is rebuilt in float32 with
its own weights, so its exports may differ from it a little more than a float32 model's do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catdog.serving import LITERT_FILE, RUNTIMES, SAVED_MODEL_DIR, ServingSpec

# The most an export's probability may differ from the Keras model's on any image and class.
# float32 exports compute what the model computes, up to the order of sums; a bf16-trained
# model's export computes in float32 what the model computed in bfloat16 (8 bits of mantissa).
TOLERANCE = {"float32": 1e-4, "mixed_bfloat16": 2e-2}
PROBE_TIMEOUT_S = 600


@dataclass(frozen=True)
class RuntimeCheck:
    runtime: str
    passed: bool
    max_difference: float | None = None  # largest |export - keras| over images and classes
    other_class: int | None = None  # images the export puts in another class (not near-ties)
    seconds: float = 0.0  # the fresh process, start to end
    problem: str | None = None  # why it could not run at all


@dataclass(frozen=True)
class ExportCheck:
    """Every runtime's verdict on an export, against the Keras model on the same images."""

    images: int
    tolerance: float
    runtimes: list[RuntimeCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.runtimes) and all(check.passed for check in self.runtimes)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "reason": self.reason()}

    def reason(self) -> str:
        """One sentence for the report and the registry."""
        parts = []
        for check in self.runtimes:
            if check.problem:
                parts.append(f"{check.runtime} did not run ({check.problem})")
            else:
                parts.append(
                    f"{check.runtime} {'agrees' if check.passed else 'disagrees'}: "
                    f"{check.other_class} of {self.images} images in another class, "
                    f"probabilities within {check.max_difference:.2g} (tolerance "
                    f"{self.tolerance:g})"
                )
        return "; ".join(parts)


def compute_precision(model: Any) -> str:
    """ "mixed_bfloat16" if any layer of `model` (nested models too) computes in bfloat16."""

    def layers(of: Any) -> list[Any]:
        found = []
        for layer in of.layers:
            found.append(layer)
            if hasattr(layer, "layers"):
                found.extend(layers(layer))
        return found

    bf16 = any(layer.dtype_policy.compute_dtype == "bfloat16" for layer in layers(model))
    return "mixed_bfloat16" if bf16 else "float32"


def serving_model(model: Any) -> Any:
    """`model` as it serves: float32 throughout, its logits turned into probabilities."""
    import keras

    from catdog import models
    from catdog.training import dtype_policy

    side = int(model.input_shape[1])
    classes = int(model.output_shape[-1])
    if compute_precision(model) != "float32":
        with dtype_policy("float32", model.name):
            float32 = models.build_model(model.name, (side, side, 3), classes, weights=None)
        float32.set_weights(model.get_weights())
        model = float32
    inputs = keras.Input(shape=(side, side, 3), dtype="float32", name="image")
    # training=False: the augmentation layers would draw at random in an endpoint otherwise.
    logits = model(inputs, training=False)
    outputs = keras.layers.Softmax(dtype="float32", name="probabilities")(logits)
    return keras.Model(inputs, outputs, name=f"{model.name}_serving")


def export_model(model: Any, folder: Path, classes: list[str]) -> ServingSpec:
    """Write `model`'s SavedModel, LiteRT model and serving.json into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    precision = compute_precision(model)
    spec = ServingSpec(
        classes=list(classes),
        image_size=int(model.input_shape[1]),
        precision=precision,
        tolerance=TOLERANCE[precision],
    )
    serving = serving_model(model)
    serving.export(str(folder / SAVED_MODEL_DIR), format="tf_saved_model", verbose=False)
    serving.export(str(folder / LITERT_FILE), format="litert", verbose=False)
    spec.save(folder)
    return spec


def check_export(folder: Path, images: Path, reference: np.ndarray) -> ExportCheck:
    """Load the export in `folder` in a fresh process per runtime, run it on `images` (a
    .npy of uint8 or float32 images) and compare with `reference` (the Keras model's
    probabilities on them): every probability must agree within the export's tolerance, so
    every image gets the same class, but one the Keras model scores within that tolerance
    of a tie (its two highest probabilities less than twice the tolerance apart)."""
    spec = ServingSpec.load(folder)
    checks = []
    with tempfile.TemporaryDirectory() as scratch:
        for runtime in RUNTIMES:
            out = Path(scratch) / f"{runtime}.npy"
            started = time.perf_counter()
            try:
                probe = subprocess.run(
                    [sys.executable, "-m", "catdog.serving", "probe", runtime, folder, images, out],
                    capture_output=True,
                    text=True,
                    timeout=PROBE_TIMEOUT_S,
                    # On the CPU: the process that trained may hold the GPU's memory.
                    env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                )
            except subprocess.TimeoutExpired:
                problem = f"no answer within {PROBE_TIMEOUT_S} s"
                checks.append(RuntimeCheck(runtime, False, problem=problem))
                continue
            seconds = time.perf_counter() - started
            if probe.returncode != 0 or not out.is_file():
                last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
                checks.append(RuntimeCheck(runtime, False, seconds=seconds, problem=last[:300]))
                continue
            got = np.load(out)
            if got.shape != reference.shape:
                problem = f"{got.shape} probabilities for {reference.shape}"
                checks.append(RuntimeCheck(runtime, False, seconds=seconds, problem=problem))
                continue
            difference = float(np.max(np.abs(got - reference))) if len(got) else 0.0
            changed = got.argmax(axis=1) != reference.argmax(axis=1)
            # An image the Keras model scores within the tolerance of a tie may go either way.
            top = np.sort(reference, axis=1)
            tied = (top[:, -1] - top[:, -2]) <= 2 * spec.tolerance
            other = int(np.sum(changed & ~tied))
            passed = other == 0 and difference <= spec.tolerance
            checks.append(RuntimeCheck(runtime, passed, difference, other, seconds))
    return ExportCheck(images=len(reference), tolerance=spec.tolerance, runtimes=checks)
