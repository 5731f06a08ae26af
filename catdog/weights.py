"""Which pretrained weights a frozen-base model loads, checked without loading TensorFlow."""

from __future__ import annotations

import os
from pathlib import Path

from catdog.errors import WeightsError

# Layers that every Keras MobileNetV2 (alpha 1.0) has, first and last of its base; a no-top
# weights file has no classification layer after them.
_MOBILENET_LAYERS = ("Conv1", "block_16_project", "out_relu")
_TOP_LAYERS = ("predictions", "Logits")
EXAMPLE_FILE = "mobilenet_v2_1.0_224_no_top.h5"


def resolve_weights(weights: str | os.PathLike[str] | None) -> str | None:
    """Normalise a weights choice for a frozen-base model, checking a local file.

    Args:
        weights: None or "none" for random initialisation, "imagenet" for Keras's ImageNet
            weights (downloaded on first use), or the path of a local MobileNetV2 no-top `.h5`
            weights file such as `mobilenet_v2_1.0_224_no_top.h5`.

    Returns:
        None, "imagenet", or the path as an absolute string.

    Raises:
        WeightsError: `weights` names a file that does not exist or is not MobileNetV2 no-top
            weights in Keras's `.h5` format.
    """
    if weights is None:
        return None
    text = os.fspath(weights)
    if text.strip().lower() in {"", "none"}:
        return None
    if text.strip().lower() == "imagenet":
        return "imagenet"
    path = Path(text).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {text!r} does not exist or is not a file")
    check_mobilenet_file(path, text)
    return str(path.resolve())


def check_mobilenet_file(path: Path, shown: str) -> None:
    """Raise WeightsError unless `path` holds MobileNetV2 no-top weights in Keras's `.h5` format.

    Keras loads a no-top MobileNetV2 from the legacy HDF5 weights format only: a wrong file is
    reported here, before any work, rather than by `load_weights` deep inside a training task.
    """
    import h5py

    expected = f"expected MobileNetV2 no-top weights in Keras's .h5 format, e.g. {EXAMPLE_FILE}"
    if path.suffix.lower() != ".h5":
        raise WeightsError(f"weights file {shown!r} is not an .h5 file; {expected}")
    try:
        with h5py.File(path, "r") as handle:
            names = {
                name.decode() if isinstance(name, bytes) else str(name)
                for name in handle.attrs.get("layer_names", [])
            }
    except OSError as exc:
        raise WeightsError(f"weights file {shown!r} is not an HDF5 file; {expected}") from exc
    missing = [layer for layer in _MOBILENET_LAYERS if layer not in names]
    if missing:
        raise WeightsError(
            f"weights file {shown!r} has no MobileNetV2 layers ({', '.join(missing)} missing); "
            f"{expected}"
        )
    top = [layer for layer in _TOP_LAYERS if layer in names]
    if top:
        raise WeightsError(
            f"weights file {shown!r} includes a classification top ({', '.join(top)}); {expected}"
        )
