"""`--warm-start production` through the flow: which model starts from production, which start
cold and why, what the summary and the report say, and a changed architecture. The weights
themselves are checked in tests/test_training.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from catdog.layout import Layout
from catdog.warm import production_start
from tests.conftest import computed, make_dataset, run_flow, write_image

pytestmark = pytest.mark.slow  # trains with TensorFlow


def test_warm_starts_from_production_say_what_each_model_started_from(
    prefect_api: None, tmp_path: Path
) -> None:
    data = make_dataset(tmp_path / "pets", train=10, validation=6)
    artifacts = tmp_path / "artifacts"
    layout = Layout.at(artifacts)
    assert production_start(layout, "model1") == "there is no production model yet"
    first = run_flow(data, artifacts, epochs=2)
    assert first["promotion"]["promoted"] and first["best_model"] == "model1"
    assert first["models"]["model1"]["warm_start"] is None  # none asked for

    for index in range(2):  # the dataset grows
        write_image(data / "train" / "cats" / f"cats.new{index}.jpg", 900 + index, bright=False)
    second = run_flow(data, artifacts, warm_start="production")
    started = second["models"]["model1"]["warm_start"]
    assert started.startswith("warm-started from production (model1, epoch ")
    assert f"- model1: {started}" in Path(second["run"]["report"]).read_text()

    # Unchanged data, whether or not that run was promoted: its training, from the same start,
    # is a cache hit (not production trained once more from its own weights).
    rerun = run_flow(data, artifacts, warm_start="production")
    assert "train_model[model1]" not in computed(rerun)
    assert rerun["models"]["model1"]["warm_start"] == started

    # An architecture that changed (a larger input: model1's Dense after Flatten grows) starts
    # cold and says so; a model that production is not starts cold, and the run says why.
    production = production_start(layout, "model1")
    assert not isinstance(production, str)
    third = run_flow(
        data, artifacts, models=["model1", "model2"], warm_start="production", image_size=48
    )
    said = third["models"]["model1"]["warm_start"]
    assert said.startswith(f"started cold, not from {production.about}: its weights do not fit")
    assert third["models"]["model2"]["warm_start"] is None
    assert third["run"]["cold_starts"] == {"model2": "production is model1, not model2"}
    report = Path(third["run"]["report"]).read_text()
    assert "- model2: started cold: production is model1, not model2" in report
