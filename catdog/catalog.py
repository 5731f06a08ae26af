"""The catalog of models: every fact about each model that the pipeline needs, in one place.

The flow, the tasks, the report, the command line and `bench/` read this table; nothing else
spells out which models exist or how each one trains. Adding a model is one entry here plus its
builder (a function `(input_shape, num_classes, *, seed, weights, dropout) -> keras.Model`,
named by `builder`). This module imports no TensorFlow, so the command line can check model
names and settings before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from catdog.config import TrainConfig
from catdog.errors import ModelError

# TrainConfig fields that change every model's result.
_COMMON_SETTINGS = ("epochs", "batch_size", "learning_rate", "strategy")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str  # one line, for --help, the README and the report
    builder: str  # "module:function" that builds it
    # Which side setting sizes its input: "image_size" (the blog's 160) or
    # "transfer_image_size" (224, what MobileNetV2's ImageNet weights were trained at).
    input_size: Literal["image_size", "transfer_image_size"] = "image_size"
    frozen_base: bool = False  # built on pretrained MobileNetV2 weights (--weights matters)
    trains_on_features: bool = False  # its head trains on cached frozen-base features
    starts_from: str | None = None  # another model whose trained weights it continues from
    # Whether "auto" precision may train it under mixed_bfloat16 where bf16 is native: only
    # where bf16 measured equal to float32 (bench/RESULTS.md).
    bfloat16: bool = False
    # The learning rate falls along a cosine to zero over its epochs, so that the last epochs
    # settle instead of swinging (batch-normalized models on raw pixels swing the most).
    cosine_decay: bool = False
    settings: tuple[str, ...] = _COMMON_SETTINGS  # TrainConfig fields that key its result
    default: bool = False  # trained by a plain run


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        "model1",
        "the blog's CNN exactly, on raw 0..255 pixels",
        "catdog.models:make_model1",
        # Three seeds of 20 epochs: validation +0.2 points at the last epoch under bf16
        # (bench/RESULTS.md, precision-model1).
        bfloat16=True,
        settings=(*_COMMON_SETTINGS, "precision"),
        default=True,
    ),
    ModelSpec(
        "model2",
        "RandomFlip and RandomRotation, then convolution blocks with batch normalization",
        "catdog.models:make_model2",
        cosine_decay=True,
        # Three paired seeds of 20 epochs: validation -1.2 points at the last epoch under bf16
        # (-0.1, -0.7, -2.6), within the seeds' spread (1.8), at 0.63x the epoch time
        # (bench/RESULTS.md, precision-model2).
        bfloat16=True,
        settings=(*_COMMON_SETTINGS, "precision"),
        default=True,
    ),
    ModelSpec(
        "model3",
        "MobileNetV2's input scaling, the augmentation, then model1's layers",
        "catdog.models:make_model3",
        bfloat16=True,  # the assignment's protocol: same accuracy under bf16
        settings=(*_COMMON_SETTINGS, "precision"),
        default=True,
    ),
    ModelSpec(
        "model4",
        "a frozen ImageNet MobileNetV2 with a small head; the head trains on cached features",
        "catdog.models:make_model4",
        input_size="transfer_image_size",
        frozen_base=True,
        # The head trains in float32 on float32 features: no dtype policy, so no "precision".
        trains_on_features=True,
        settings=(*_COMMON_SETTINGS, "feature_views", "dropout"),
        default=True,
    ),
    ModelSpec(
        "model4_finetune",
        "model4, then MobileNetV2 from layer finetune_at on trained at a low rate",
        "catdog.models:make_model4_finetune",
        input_size="transfer_image_size",
        frozen_base=True,
        starts_from="model4",
        bfloat16=True,  # its fine-tuning; three seeds scored 98.0-99.0% test accuracy
        # model4's own settings (feature_views) reach it through model4's trained weights.
        settings=(
            *_COMMON_SETTINGS,
            "precision",
            "dropout",
            "finetune_epochs",
            "finetune_at",
            "finetune_learning_rate",
        ),
    ),
)

CATALOG: dict[str, ModelSpec] = {spec.name: spec for spec in MODELS}
MODEL_NAMES: tuple[str, ...] = tuple(CATALOG)
DEFAULT_MODELS: tuple[str, ...] = tuple(spec.name for spec in MODELS if spec.default)
# For type hints that validate a name (Prefect checks a deployment run's parameters with it).
ModelName = Literal[MODEL_NAMES]  # type: ignore[valid-type]


def spec(name: str) -> ModelSpec:
    """The catalog entry of model `name`.

    Raises:
        ModelError: No model has that name.
    """
    try:
        return CATALOG[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; choose from {', '.join(CATALOG)}") from None


def with_prerequisites(names: list[str]) -> list[str]:
    """`names` in order, each preceded by the models it starts from when not already asked for."""
    ordered: list[str] = []
    for name in names:
        chain = []
        current: str | None = name
        while current is not None and current not in ordered and current not in chain:
            chain.append(current)
            current = spec(current).starts_from
        ordered.extend(reversed(chain))
    return ordered


def training_settings(name: str, config: TrainConfig) -> dict[str, object]:
    """Only the settings of `config` that change model `name`'s result, so a change to another
    model's settings keeps this one's cache."""
    wanted = spec(name).settings
    return {key: value for key, value in asdict(config).items() if key in wanted}
