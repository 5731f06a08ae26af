"""Run an exported model without Keras: LiteRT (no TensorFlow import), or the TensorFlow
SavedModel that TensorFlow Serving serves. `catdog.export` writes both.

What every export takes and returns (also in its `serving.json`):
- input: float32 RGB images, shape (n, side, side, 3), values 0..255 (the decoded pixels,
  resized to the model's side as `catdog.data.images.load_image` does);
- output: float32 class probabilities, shape (n, classes), in the order of `classes`.

    python -m catdog.serving probe litert EXPORT_DIR IMAGES.npy OUT.npy   (a fresh process)
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
    tolerance: float  # the most an export's probability may differ from the Keras model's

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


def predict_in_batches(predict: Predictor, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    outputs = [
        predict(np.asarray(images[start : start + batch_size], dtype=np.float32))
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs)


def main(argv: list[str]) -> int:
    """`probe RUNTIME EXPORT_DIR IMAGES.npy OUT.npy`: the export's probabilities on the images."""
    if len(argv) != 5 or argv[0] != "probe" or argv[1] not in RUNTIMES:
        print(f"usage: python -m catdog.serving probe {{{','.join(RUNTIMES)}}} DIR IN OUT")
        return 2
    runtime, folder, images, out = argv[1], Path(argv[2]), Path(argv[3]), Path(argv[4])
    probabilities = predict_in_batches(predictor(folder, runtime), np.load(images, mmap_mode="r"))
    np.save(out, probabilities.astype(np.float32))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
