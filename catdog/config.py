"""Every default of the pipeline, in one place, one comment each.

The flow's parameters take their defaults from here, and the command line and the deployment
take theirs from the flow's parameters. Which models exist is `catdog.catalog`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OFFICIAL_DATA_URL = "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"
MIN_MOBILENET_SIZE = 32  # MobileNetV2 refuses smaller inputs
# warn: train and promote as usual, and say so; hold: train and report, keep production;
# stop: stop before training.
DataIssuePolicy = Literal["warn", "hold", "stop"]


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 160  # images are resized to image_size x image_size, as in the blog
    # Input side of the frozen-base (MobileNetV2) models: 224, the size their ImageNet
    # weights were trained at. At the blog's 160, the frozen-base model's test accuracy over
    # three seeds was 96.0% against 99.0% at 224 (bench/RESULTS.md, sizes-model4).
    transfer_image_size: int = 224
    test_fraction: float = 0.2  # of validation/ held out as test (the blog's val_batches // 5)
    flat_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train/val/test, flat roots
    max_images_per_class: int | None = None  # cap per class and split (smoke runs, scaling tests)
    samples_per_class: int = 3  # training images per class in the sample grid, as the blog's
    augmentation_draws: int = 6  # augmented views of one image in the augmentation preview


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20  # epochs per model, the assignment's protocol
    batch_size: int = 32  # as image_dataset_from_directory's default and the blog
    learning_rate: float = 1e-3  # Adam's default, as the blog compiles with "adam"
    finetune_epochs: int = 10  # extra epochs of a fine-tuned model, as the TF tutorial
    finetune_at: int = 100  # first MobileNetV2 layer unfrozen by fine-tuning (of 154)
    # The TensorFlow transfer-learning tutorial's: a tenth of its base rate (1e-4). A tenth of
    # Adam's 1e-3 moves the unfrozen ImageNet layers too far and loses accuracy.
    finetune_learning_rate: float = 1e-5
    # Cached views per training image for frozen-base models: the image, its mirror image,
    # then draws of RandomFlip + RandomRotation. Each view costs one pass through the base.
    # At 224x224 a second view (the mirror image) moved neither validation nor test accuracy
    # over three seeds (bench/RESULTS.md, sizes-model4), and training took 25% longer (72 s
    # against 58 s, extraction included).
    feature_views: int = 1
    dropout: float = 0.2  # dropout before a frozen-base model's classification head
    # "auto": mixed_bfloat16 for the models whose catalog entry allows it, where the hardware
    # computes bf16 natively (AVX512-BF16/AMX CPUs, GPUs), else float32; or name a Keras dtype
    # policy ("float32", "mixed_bfloat16"). A head trained on cached features is float32.
    precision: str = "auto"
    # "mirrored": one model's batches split over every visible GPU (or, with none, over the
    # logical CPU devices), its gradients summed, with tf.distribute.MirroredStrategy.
    strategy: str = "default"


@dataclass(frozen=True)
class PipelineConfig:
    seed: int = 1337  # one seed for the split, the sample figures and training
    artifacts: str = "artifacts"  # output folder (env CATDOG_ARTIFACTS on the command lines)
    promote_margin: float = 0.0  # accuracy a new best model must gain over production's
    download_retries: int = 4  # retries of a transient download failure, with backoff
    train_retries: int = 0  # retries of a failed training task; each resumes where it died
    # After its report a run removes the stage outputs that none of this many of the latest
    # runs used (0 keeps everything); `cache prune` keeps as many by default.
    keep_runs: int = 5
    approval_timeout: int = 24 * 3600  # seconds a run waits for --approve-promotion's answer
    # What a run does when its data fails a check against production's: "warn" reports it and
    # promotes as usual; a scheduled run, which nobody watches, "hold"s production back.
    on_data_issue: DataIssuePolicy = "warn"
    unattended_on_data_issue: DataIssuePolicy = "hold"
    # `catdog watch`: seconds between looks at the source, and how long a change must stay
    # unchanged before it is announced (a folder being copied into is one change).
    watch_every: int = 300
    watch_settle: float = 60.0
    # `catdog alerts`: a run whose heartbeats (every 180 s by default) stop this many seconds
    # is marked crashed.
    silent_after: int = 600


DATA, TRAIN, RUN = DataConfig(), TrainConfig(), PipelineConfig()
