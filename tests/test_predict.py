"""`predict` on real photos with the production model a real (tiny) run promoted."""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import numpy as np
import pytest

from catdog import predict
from catdog.data.images import load_image
from catdog.evaluation import load_model
from catdog.layout import Layout
from catdog.registry import read as read_registry
from tests.conftest import REAL_ZIP, run_flow

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    predict.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    if not REAL_ZIP.is_file():
        pytest.skip("the shared dataset is not present")
    artifacts = tmp_path_factory.mktemp("predict") / "artifacts"
    run_flow(REAL_ZIP, artifacts, max_images_per_class=8)
    return artifacts


@pytest.fixture
def photos(tmp_path) -> Path:
    if not REAL_ZIP.is_file():
        pytest.skip("the shared dataset is not present")
    folder = tmp_path / "photos"
    folder.mkdir()
    with zipfile.ZipFile(REAL_ZIP) as archive:
        for name in ("cat.2000.jpg", "dog.2000.jpg", "cat.2001.jpg"):
            member = next(n for n in archive.namelist() if n.endswith("/" + name))
            (folder / name).write_bytes(archive.read(member))
    return folder


def test_predict_files_prints_class_and_probability(trained, photos, capsys):
    code = predict.run(
        _args(
            str(photos / "cat.2000.jpg"), str(photos / "dog.2000.jpg"), "--artifacts", str(trained)
        )
    )
    out = capsys.readouterr()
    assert code == 0
    lines = out.out.strip().splitlines()
    assert len(lines) == 2
    # What the production model itself says, computed here without predict's code: the same
    # class name (the registry's order) and probability.
    production = read_registry(Layout.at(trained)).production
    model = load_model(trained / production.archive)
    for line, name in zip(lines, ("cat.2000.jpg", "dog.2000.jpg"), strict=True):
        path, label, probability = line.split("\t")
        assert path.endswith(name)
        pixels = load_image(photos / name, int(model.input_shape[1]))  # the serving contract
        logits = model.predict(pixels.astype(np.float32)[None], verbose=0)[0]
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert label == production.classes[int(expected.argmax())]
        assert float(probability) == pytest.approx(float(expected.max()), abs=1e-3)
    assert "(production, keras)" in out.err


def test_folder_gives_csv_and_a_bad_file_gets_its_own_error(trained, photos, capsys, tmp_path):
    (photos / "broken.jpg").write_bytes(b"this is not a jpeg")
    csv_path = tmp_path / "out.csv"
    code = predict.run(_args(str(photos), "--artifacts", str(trained), "--csv", str(csv_path)))
    out = capsys.readouterr()
    assert code == 1
    rows = out.out.strip().splitlines()
    assert rows[0] == "path,class,probability"
    assert len(rows) == 4  # header + the three readable photos
    assert "broken.jpg" in out.err and "cannot read image" in out.err
    assert csv_path.read_text().count("\n") == 4


def test_no_model_anywhere_is_a_clear_error(tmp_path, photos):
    from catdog.errors import ModelError

    with pytest.raises(ModelError, match="no production model"):
        predict.run(_args(str(photos), "--artifacts", str(tmp_path / "empty")))
