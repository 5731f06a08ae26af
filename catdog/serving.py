"""Run an exported model without Keras: LiteRT (no TensorFlow import), or the TensorFlow
SavedModel that TensorFlow Serving serves. `catdog.export` writes both.

What every export takes and returns (also in its `serving.json`):
- input: float32 RGB images, shape (n, side, side, 3), values 0..255 (the decoded pixels,
  resized to the model's side as `catdog.data.images.load_image` does);
- output: float32 class probabilities, shape (n, classes), in the order of `classes`.

    python -m catdog.serving probe EXPORT_DIR IMAGES.npy OUT_DIR   (a fresh process: each
    runtime's probabilities on the images, in OUT_DIR/<runtime>.npy)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SERVING_FILE = "serving.json"  # what the export takes and returns, and the class names
LITERT_FILE = "model.tflite"
SAVED_MODEL_DIR = "saved_model"
SIGNATURE = "serve"  # the SavedModel's endpoint: TensorFlow Serving's signature_name
RUNTIMES = ("litert", "savedmodel")


@dataclass(frozen=True)
class ServingSpec:
    """What an export takes and returns."""

    classes: list[str]
    image_size: int  # the square side of its input images
    precision: str  # the dtype policy the model trained under; the export computes float32
    # The most an export's probability may differ from the float32 model it was made from.
    tolerance: float

    def save(self, folder: Path) -> None:
        facts = {
            **asdict(self),
            "input": f"float32 RGB images, shape (n, {self.image_size}, {self.image_size}, 3), "
            "values 0..255",
            "output": f"float32 probabilities, shape (n, {len(self.classes)})",
            "signature": SIGNATURE,
        }
        (folder / SERVING_FILE).write_text(json.dumps(facts, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> ServingSpec:
        facts = json.loads((folder / SERVING_FILE).read_text())
        return cls(**{name: facts[name] for name in cls.__dataclass_fields__})


Predictor = Callable[[np.ndarray], np.ndarray]  # float32 images -> probabilities


def litert_predictor(folder: Path) -> Predictor:
    """The LiteRT model of an export, through `ai-edge-litert` (no TensorFlow import)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(folder / LITERT_FILE))
    source = interpreter.get_input_details()[0]["index"]
    target = interpreter.get_output_details()[0]["index"]
    shape: tuple[int, ...] = ()

    def predict(images: np.ndarray) -> np.ndarray:
        nonlocal shape
        if images.shape != shape:  # a new batch size: resize the input, once per size
            interpreter.resize_tensor_input(source, images.shape)
            interpreter.allocate_tensors()
            shape = images.shape
        interpreter.set_tensor(source, np.ascontiguousarray(images, dtype=np.float32))
        interpreter.invoke()
        return np.array(interpreter.get_tensor(target))

    return predict


def savedmodel_predictor(folder: Path) -> Predictor:
    """The SavedModel of an export, loaded by TensorFlow as TensorFlow Serving would."""
    import tensorflow as tf

    endpoint = tf.saved_model.load(str(folder / SAVED_MODEL_DIR)).signatures[SIGNATURE]

    def predict(images: np.ndarray) -> np.ndarray:
        (output,) = endpoint(tf.constant(images, dtype=tf.float32)).values()
        return np.asarray(output)

    return predict


def predictor(folder: Path, runtime: str) -> Predictor:
    """The export in `folder` run by `runtime` ("litert" or "savedmodel")."""
    return {"litert": litert_predictor, "savedmodel": savedmodel_predictor}[runtime](folder)


# Small batches: a 224x224 MobileNetV2's activations, not the images, take the memory. The
# export check's probe of 200 such images held 1.32 GB at 32 images a batch, 0.89 GB at 8 and
# 0.79 GB at 2 (TensorFlow's import alone: 0.58 GB), in 6.9, 6.6 and 7.7 s.
PROBE_BATCH = 2


def predict_in_batches(
    predict: Predictor, images: np.ndarray, batch_size: int = PROBE_BATCH
) -> np.ndarray:
    outputs = [
        predict(np.asarray(images[start : start + batch_size], dtype=np.float32))
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs)


def main(argv: list[str]) -> int:
    """`probe EXPORT_DIR IMAGES.npy OUT_DIR`: each runtime's probabilities on the images, in
    OUT_DIR/<runtime>.npy (or why not, in OUT_DIR/<runtime>.error); LiteRT first, so that its
    run owes nothing to TensorFlow's import."""
    if len(argv) != 4 or argv[0] != "probe":
        print("usage: python -m catdog.serving probe EXPORT_DIR IMAGES.npy OUT_DIR")
        return 2
    folder, images, out = Path(argv[1]), np.load(argv[2], mmap_mode="r"), Path(argv[3])
    failed = False
    for runtime in RUNTIMES:
        try:
            probabilities = predict_in_batches(predictor(folder, runtime), images)
        except Exception as error:  # reported per runtime: the other one still runs
            problem = f"{type(error).__name__}: {' '.join(str(error).split())}"
            (out / f"{runtime}.error").write_text(problem[:300])
            failed = True
            continue
        np.save(out / f"{runtime}.npy", probabilities.astype(np.float32))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
