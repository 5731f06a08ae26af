"""The flow's parameters: type, constraint and description of each, defined once.

Prefect validates every run's parameters against these types (a deployment run from the UI or
a schedule as much as a run from the command line), shows the descriptions in its parameter
form, and `flows/cli.py` builds the command line from them. Defaults live in
`catdog.config` and the model names in `catdog.catalog`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from catdog.catalog import ModelName
from catdog.config import MIN_MOBILENET_SIZE, DataIssuePolicy
from catdog.stages import CACHED_STAGES
from catdog.warm import WarmStartSource

RefreshStage = Literal[("all", *CACHED_STAGES)]  # type: ignore[valid-type]
PrecisionName = Literal["auto", "float32", "mixed_bfloat16"]
StrategyName = Literal["default", "mirrored"]

Data = Annotated[
    str, Field(description="dataset: an http(s) or file URL, a .zip, or a folder of class folders")
]
Models = Annotated[list[ModelName], Field(min_length=1, description="models to train")]
Epochs = Annotated[int, Field(ge=1, description="epochs per model")]
Seed = Annotated[int, Field(description="seed of the split, the sample figures and training")]
Weights = Annotated[
    str,
    Field(
        description="MobileNetV2 weights of the frozen-base models: 'imagenet' (downloaded by "
        "Keras), 'none' (random), or a MobileNetV2 no-top .h5 file"
    ),
]
Artifacts = Annotated[str, Field(description="output folder")]
Offline = Annotated[
    bool,
    Field(
        description="use the last good download of a dataset URL without asking the server "
        "whether it changed"
    ),
]
Refresh = Annotated[
    RefreshStage | None,
    Field(description="ignore caches: 'all' stages, or STAGE and every later one"),
]
Sha256 = Annotated[str | None, Field(description="expected SHA-256 of the downloaded archive")]
ImageSize = Annotated[int, Field(ge=1, description="square side of the images")]
TransferImageSize = Annotated[
    int,
    Field(
        ge=MIN_MOBILENET_SIZE,
        description="square side of the images for the frozen-base models, the size "
        "MobileNetV2's ImageNet weights were trained at",
    ),
]
BatchSize = Annotated[int, Field(ge=1, description="batch size")]
MaxImagesPerClass = Annotated[
    int | None,
    Field(ge=2, description="use at most this many images per class and split (quick tries)"),
]
FinetuneEpochs = Annotated[int, Field(ge=1, description="extra epochs of a fine-tuned model")]
FeatureViews = Annotated[
    int,
    Field(
        ge=1,
        description="cached views per training image for a head trained on features: the "
        "image, its mirror image, then draws of the augmentation",
    ),
]
PromoteMargin = Annotated[
    float,
    Field(ge=0, le=1, description="accuracy a new best model must gain over production"),
]
MinAccuracy = Annotated[
    float | None,
    Field(ge=0, le=1, description="promote no model whose test accuracy is under this floor"),
]
MinClassRecall = Annotated[
    float | None,
    Field(
        ge=0,
        le=1,
        description="promote no model whose test recall of any class is under this floor",
    ),
]
MaxPValue = Annotated[
    float | None,
    Field(
        gt=0,
        le=1,
        description="promote over production only if the exact McNemar test on the shared "
        "test images gives at most this p-value",
    ),
]
TrainRetries = Annotated[
    int, Field(ge=0, description="retries of a failed training task; each resumes")
]
DownloadRetries = Annotated[
    int, Field(ge=0, description="retries of a transient download failure, with backoff")
]
Precision = Annotated[
    PrecisionName,
    Field(
        description="training dtype policy: auto trains the models that allow it under "
        "bfloat16 where the CPU or GPU computes it natively, float32 otherwise; a head "
        "trained on cached features is always float32"
    ),
]
Strategy = Annotated[
    StrategyName,
    Field(
        description="how one model trains: default on one device; mirrored over every visible "
        "GPU of the machine that trains it (tf.distribute.MirroredStrategy)"
    ),
]
Export = Annotated[
    bool,
    Field(
        description="export a model the gate would promote (TensorFlow SavedModel, LiteRT) and "
        "promote it only if each export, loaded in a fresh process, gives its probabilities"
    ),
]
KeepRuns = Annotated[
    int,
    Field(
        ge=0,
        description="after the report, remove stage outputs that none of the last N runs used, "
        "as `catdog cache prune` does (0 keeps everything)",
    ),
]
OnDataIssue = Annotated[
    DataIssuePolicy,
    Field(
        description="when this run's data differs from the data that trained production (class "
        "balance, image properties, feature embeddings): warn (train and promote as usual, and "
        "say so), hold (train and report, keep production) or stop (stop before training)"
    ),
]
ApprovePromotion = Annotated[
    bool,
    Field(
        description="when the gate would promote, pause the run for a person's approval in the "
        "Prefect UI (needs a Prefect server); no answer within the timeout keeps production"
    ),
]
ApprovalTimeout = Annotated[
    int, Field(ge=1, description="seconds to wait for an approval before keeping production")
]
WarmStartFrom = Annotated[
    WarmStartSource,
    Field(
        description="start each model's training from the production model's weights where "
        "production is that model and its weights fit (then --epochs is how many more epochs); "
        "the others start cold, and the run says which and why"
    ),
]
