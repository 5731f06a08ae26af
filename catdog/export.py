"""Export a trained model for serving, and check every export in a fresh process.

An export is a folder: a TensorFlow SavedModel (`saved_model/`, servable by TensorFlow
Serving), a LiteRT model (`model.tflite`, run by `ai-edge-litert` without TensorFlow) and
`serving.json` (input, output, class names; see `catdog.serving`). Both compute in float32 and
end in class probabilities: a model trained under mixed_bfloat16 is first rebuilt in float32
with its own weights (the "served model").

The check compares each export, on the same images in a fresh process, with the model it was
made from: the same float32 computation up to the order of sums, so within `TOLERANCE`. For a
float32 model that is the model as trained and evaluated. A bf16-trained model's float32
rebuild is judged against the trained model apart, by what users see (float32 arithmetic on
bf16-trained weights moves probabilities): no image in another class but near-ties
(`TIE_MARGIN`), and the same accuracy within `ACCURACY_IMAGES` images (`ACCURACY_SHARE` of a
larger test split).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from catdog.io import JsonObject, replace_directory
from catdog.serving import LITERT_FILE, RUNTIMES, SAVED_MODEL_DIR, ServingSpec

# The most an export's probability may differ from the served model's on any image and class
# (and a float32 served model's from the model as trained): the same float32 computation.
TOLERANCE = 1e-4
# A bf16-trained model's image may change class in float32 only if the trained model's top two
# probabilities are at most this far apart (at most 60/40 between two classes): over every bf16
# model of the catalog and three seeds, float32 moved a probability by up to 0.17 and the images
# that changed class had gaps of 0.025 at most (bench/RESULTS.md, export-precision).
TIE_MARGIN = 0.2
# The served model's test accuracy may differ from the trained model's by at most this many
# images, or this share of them on a larger test split (measured: at most 1 of 200).
ACCURACY_IMAGES = 1
ACCURACY_SHARE = 0.005
PROBE_TIMEOUT_S = 600
BATCH = 32  # images per predict call on the served model, in the run's own process


@dataclass(frozen=True)
class RuntimeCheck:
    runtime: str
    passed: bool
    max_difference: float | None = None  # largest |export - served| over images and classes
    other_class: int | None = None  # images the export puts in another class (not near-ties)
    seconds: float = 0.0  # its share of the fresh process
    problem: str | None = None  # why it could not run at all


@dataclass(frozen=True)
class PrecisionCheck:
    """A bf16-trained model's float32 rebuild (what its exports serve) against the model as
    trained, on the test split."""

    trained_precision: str  # "mixed_bfloat16"
    images: int
    max_difference: float  # largest |served - trained| probability
    changed: int  # images the served model puts in another class
    near_ties: int  # of those, images the trained model scored within TIE_MARGIN of a tie
    accuracy_trained: float | None  # on the test labels, where known
    accuracy_served: float | None
    passed: bool

    def reason(self) -> str:
        accuracy = (
            f", test accuracy {self.accuracy_trained:.4f} trained, "
            f"{self.accuracy_served:.4f} served"
            if self.accuracy_trained is not None and self.accuracy_served is not None
            else ""
        )
        return (
            f"{self.trained_precision}-trained model served in float32: {self.changed} of "
            f"{self.images} images in another class ({self.near_ties} of them near-ties, "
            f"top two within {TIE_MARGIN:g}), probabilities within {self.max_difference:.2g}"
            f"{accuracy}"
        )


@dataclass(frozen=True)
class ExportCheck:
    """Every runtime's verdict on an export against the served model, and the served model's
    against the model as trained."""

    images: int
    tolerance: float
    runtimes: list[RuntimeCheck] = field(default_factory=list)
    precision: PrecisionCheck | None = None  # None: a float32 model, served as it is

    @property
    def passed(self) -> bool:
        served_ok = self.precision is None or self.precision.passed
        return bool(self.runtimes) and all(c.passed for c in self.runtimes) and served_ok

    def to_json(self) -> JsonObject:
        return {**asdict(self), "passed": self.passed, "reason": self.reason()}

    @classmethod
    def from_json(cls, facts: JsonObject) -> ExportCheck:
        """The check `to_json` wrote ("passed" and "reason" follow from the rest)."""
        precision = facts["precision"]
        return cls(
            images=facts["images"],
            tolerance=facts["tolerance"],
            runtimes=[RuntimeCheck(**check) for check in facts["runtimes"]],
            precision=PrecisionCheck(**precision) if precision else None,
        )

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
        if self.precision is not None:
            verdict = "passes" if self.precision.passed else "fails"
            parts.append(f"{self.precision.reason()}: {verdict}")
        return "; ".join(parts)


def near_ties(probabilities: np.ndarray, margin: float) -> np.ndarray:
    """Per image: whether its two highest probabilities are at most `margin` apart."""
    if probabilities.shape[1] < 2:
        return np.zeros(len(probabilities), dtype=bool)
    top = np.sort(probabilities, axis=1)
    return (top[:, -1] - top[:, -2]) <= margin


def judge_precision(
    trained: np.ndarray,
    served: np.ndarray,
    trained_precision: str,
    labels: Sequence[int] | None = None,
) -> PrecisionCheck:
    """Judge a bf16-trained model's float32 rebuild by its probabilities against the trained
    model's on the same images: no image in another class but near-ties (`TIE_MARGIN`), and
    the accuracy on `labels` within `ACCURACY_IMAGES` images (or `ACCURACY_SHARE` of them)."""
    difference = float(np.max(np.abs(served - trained))) if len(trained) else 0.0
    changed = served.argmax(axis=1) != trained.argmax(axis=1)
    ties = changed & near_ties(trained, TIE_MARGIN)
    accuracy_trained = accuracy_served = None
    apart = 0.0
    if labels is not None and len(labels):
        truth = np.asarray(labels)
        accuracy_trained = float(np.mean(trained.argmax(axis=1) == truth))
        accuracy_served = float(np.mean(served.argmax(axis=1) == truth))
        apart = abs(accuracy_served - accuracy_trained) * len(trained)
    allowed = max(ACCURACY_IMAGES, ACCURACY_SHARE * len(trained))
    return PrecisionCheck(
        trained_precision=trained_precision,
        images=len(trained),
        max_difference=difference,
        changed=int(changed.sum()),
        near_ties=int(ties.sum()),
        accuracy_trained=accuracy_trained,
        accuracy_served=accuracy_served,
        passed=int(changed.sum()) == int(ties.sum()) and round(apart, 6) <= allowed,
    )


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
    return _export(serving_model(model), compute_precision(model), folder, classes)


def _export(served: Any, precision: str, folder: Path, classes: list[str]) -> ServingSpec:
    folder.mkdir(parents=True, exist_ok=True)
    spec = ServingSpec(
        classes=list(classes),
        image_size=int(served.input_shape[1]),
        precision=precision,
        tolerance=TOLERANCE,
    )
    served.export(str(folder / SAVED_MODEL_DIR), format="tf_saved_model", verbose=False)
    served.export(str(folder / LITERT_FILE), format="litert", verbose=False)
    spec.save(folder)
    return spec


def export_checked(
    model: Any,
    folder: Path,
    classes: list[str],
    images: Path,
    trained: np.ndarray,
    labels: Sequence[int] | None = None,
) -> ExportCheck:
    """Export `model` (a Keras model, or the path of one, which is then let go before the
    probe) into `folder` and check it on `images` (a .npy of images) against `trained` (the
    model's own probabilities on them; `labels` their classes, where known).

    A float32 model serves as it is: each export, in a fresh process, is compared with
    `trained` itself. A model trained under bf16 is served by its float32 rebuild: each export
    is compared with that model's probabilities, and those with `trained` by classes and
    accuracy (`judge_precision`)."""
    if isinstance(model, str | Path):
        from catdog.evaluation import load_model

        model = load_model(model)
    precision = compute_precision(model)
    served = serving_model(model)
    _export(served, precision, folder, classes)
    reference = trained if precision == "float32" else _probabilities(served, images)
    del served, model
    release_memory()  # before the probe process starts: the sum of the two is the run's peak
    check = check_export(folder, images, reference)
    if precision == "float32":
        return check
    return replace(check, precision=judge_precision(trained, reference, precision, labels))


def export_into(folder: Path, make: Callable[[Path], ExportCheck], images: int) -> ExportCheck:
    """Let `make` export into a staging folder and check it; the exports become `folder` only if
    they pass (one a crashed run left there is replaced), and nothing is left behind if not.
    An export that cannot be made at all fails its check, saying why (`images`: how many the
    check would have compared)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staged = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    try:
        try:
            check = make(staged)
        except Exception as error:  # an export that cannot be made keeps production, saying why
            problem = f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]
            failed = RuntimeCheck("export", False, problem=problem)
            return ExportCheck(images=images, tolerance=0.0, runtimes=[failed])
        if check.passed:
            replace_directory(staged, folder)
        return check
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _probabilities(served: Any, images: Path) -> np.ndarray:
    """`served`'s probabilities on the images, through Keras's predict a batch at a time:
    called eagerly, a 224x224 MobileNetV2 held gigabytes of activations."""
    pixels = np.load(images, mmap_mode="r")
    batches = [
        served.predict(np.asarray(pixels[start : start + BATCH], np.float32), verbose=0)
        for start in range(0, len(pixels), BATCH)
    ]
    return np.concatenate(batches) if batches else np.zeros((0, served.output_shape[-1]))


def release_memory() -> None:
    """Give the heap's free pages back to the system (glibc only; elsewhere nothing)."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def check_export(folder: Path, images: Path, reference: np.ndarray) -> ExportCheck:
    """Load the export in `folder` in a fresh process, run each runtime on `images` (a .npy of
    uint8 or float32 images) and compare with `reference` (the probabilities of the served
    model it was made from): every probability within `TOLERANCE`, so every image gets the
    same class, but one the reference scores within that tolerance of a tie."""
    checks = []
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        problem = None
        try:
            # One process for both runtimes, one after the other: Python, numpy and the images
            # load once. On the CPU: the process that trained may hold the GPU's memory.
            probe = subprocess.run(
                [sys.executable, "-m", "catdog.serving", "probe", folder, images, scratch],
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT_S,
                env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
            )
            if probe.returncode != 0:  # the process's last words, for a runtime that left none
                problem = ((probe.stderr.strip().splitlines() or ["no output"])[-1])[:300]
        except subprocess.TimeoutExpired:
            problem = f"no answer within {PROBE_TIMEOUT_S} s"
        seconds = time.perf_counter() - started
        for runtime in RUNTIMES:
            out, error = Path(scratch) / f"{runtime}.npy", Path(scratch) / f"{runtime}.error"
            if not out.is_file():
                said = error.read_text() if error.is_file() else problem
                checks.append(RuntimeCheck(runtime, False, problem=said or "no output"))
                continue
            checks.append(_compare(runtime, np.load(out), reference, seconds / len(RUNTIMES)))
    return ExportCheck(images=len(reference), tolerance=TOLERANCE, runtimes=checks)


def _compare(runtime: str, got: np.ndarray, reference: np.ndarray, seconds: float) -> RuntimeCheck:
    if got.shape != reference.shape:
        problem = f"{got.shape} probabilities for {reference.shape}"
        return RuntimeCheck(runtime, False, seconds=seconds, problem=problem)
    difference = float(np.max(np.abs(got - reference))) if len(got) else 0.0
    changed = got.argmax(axis=1) != reference.argmax(axis=1)
    # An image the served model scores within the tolerance of a tie may go either way.
    other = int(np.sum(changed & ~near_ties(reference, 2 * TOLERANCE)))
    passed = other == 0 and difference <= TOLERANCE
    return RuntimeCheck(runtime, passed, difference, other, seconds)
