"""The model catalog: names, prerequisites, and the settings that key each model's cache."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest

from catdog import catalog
from catdog.config import TrainConfig
from catdog.errors import ModelError


def test_default_run_trains_the_assignments_four_models():
    assert catalog.DEFAULT_MODELS == ("model1", "model2", "model3", "model4")
    assert set(catalog.DEFAULT_MODELS) < set(catalog.MODEL_NAMES)


def test_a_run_accepts_every_catalog_model_and_nothing_else():
    """What Prefect checks a deployment run's `models` against, and the command line too."""
    from pydantic import TypeAdapter, ValidationError

    from flows.parameters import Models

    models = TypeAdapter(Models)
    assert models.validate_python(list(catalog.MODEL_NAMES)) == list(catalog.MODEL_NAMES)
    for wrong in (["model9"], [], ["model1", "Model2"]):
        with pytest.raises(ValidationError):
            models.validate_python(wrong)


def test_unknown_name_says_what_exists():
    with pytest.raises(ModelError, match=r"unknown model 'model9'; choose from model1, model2"):
        catalog.spec("model9")


def test_every_entry_is_consistent():
    settings = {field.name for field in fields(TrainConfig)}
    for spec in catalog.MODELS:
        assert set(spec.settings) <= settings, spec.name
        assert ":" in spec.builder and spec.description
        if spec.starts_from:
            assert spec.starts_from in catalog.CATALOG
            assert {"finetune_epochs", "finetune_learning_rate"} <= set(spec.settings)
        if spec.trains_on_features:
            assert spec.frozen_base and "feature_views" in spec.settings
            assert "precision" not in spec.settings  # its head trains in float32
        else:  # trained under --precision's dtype policy, so keyed by it
            assert "precision" in spec.settings


def test_prerequisites_come_first_once():
    assert catalog.with_prerequisites(["model4_finetune"]) == ["model4", "model4_finetune"]
    assert catalog.with_prerequisites(["model1", "model4_finetune", "model4"]) == [
        "model1",
        "model4",
        "model4_finetune",
    ]
    assert catalog.with_prerequisites(["model4", "model4_finetune"]) == [
        "model4",
        "model4_finetune",
    ]
    with pytest.raises(ModelError):
        catalog.with_prerequisites(["nope"])


# Settings that change every model's result; the distribution strategy too (replicas keep
# their own batch-normalization statistics).
COMMON = {"epochs", "batch_size", "learning_rate", "strategy"}


@pytest.mark.parametrize(
    ("name", "keyed"),
    [
        ("model1", {*COMMON, "precision"}),
        ("model2", {*COMMON, "precision"}),
        ("model4", {*COMMON, "feature_views", "dropout"}),
        (
            "model4_finetune",
            {
                *COMMON,
                "precision",
                "dropout",
                "finetune_epochs",
                "finetune_at",
                "finetune_learning_rate",
            },
        ),
    ],
)
def test_training_settings_keep_only_what_changes_the_model(name, keyed):
    settings = catalog.training_settings(name, TrainConfig())
    assert set(settings) == keyed
    assert settings["epochs"] == TrainConfig().epochs


def test_catalog_imports_no_tensorflow():
    code = "import sys, catdog.catalog, catdog.checks; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
