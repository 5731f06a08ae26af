"""Weights choices are checked without TensorFlow, before any work."""

from __future__ import annotations

import h5py
import pytest

from catdog.errors import WeightsError
from catdog.weights import resolve_weights
from tests.conftest import REAL_WEIGHTS


def fake_weights(path, layer_names):
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [name.encode() for name in layer_names]
    return path


def test_named_choices_need_no_file():
    assert resolve_weights(None) is None
    assert resolve_weights("None") is None
    assert resolve_weights("imagenet") == "imagenet"


@pytest.mark.skipif(not REAL_WEIGHTS.is_file(), reason="shared MobileNetV2 weights absent")
def test_real_mobilenet_no_top_file_is_accepted():
    assert resolve_weights(str(REAL_WEIGHTS)) == str(REAL_WEIGHTS.resolve())


def test_a_file_with_mobilenet_layers_and_no_top_is_accepted(tmp_path):
    path = fake_weights(tmp_path / "w.h5", ["input_layer", "Conv1", "block_16_project", "out_relu"])
    assert resolve_weights(str(path)) == str(path.resolve())


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("nope.h5", None, r"nope\.h5' does not exist"),
        ("weights.bin", b"x", r"weights\.bin' is not an \.h5 file"),
        ("text.h5", b"not hdf5 at all", r"text\.h5' is not an HDF5 file"),
    ],
)
def test_wrong_files_are_named_with_what_was_expected(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=message) as info:
        resolve_weights(str(path))
    assert "\n" not in str(info.value)


def test_weights_of_another_network_are_refused(tmp_path):
    path = fake_weights(tmp_path / "resnet.h5", ["conv1_conv", "conv5_block3_out"])
    with pytest.raises(WeightsError, match="no MobileNetV2 layers"):
        resolve_weights(str(path))


def test_weights_with_a_classification_top_are_refused(tmp_path):
    path = fake_weights(
        tmp_path / "top.h5", ["Conv1", "block_16_project", "out_relu", "predictions"]
    )
    with pytest.raises(WeightsError, match="classification top"):
        resolve_weights(str(path))
