"""Checks of a run's inputs that fail before any work, from the command line or at a flow
run's start (a deployment or the UI starts runs without the command line)."""

from __future__ import annotations

from collections.abc import Sequence

from catdog import catalog
from catdog.data import sources
from catdog.data.extract import find_dataset_root
from catdog.data.store_source import locate_dataset
from catdog.store import StoreError, StoreFault
from catdog.weights import resolve_weights


def check_data_source(data: str) -> None:
    """Raise DataError unless `data` is a URL, a zip with class folders, or a folder of them."""
    source = sources.parse_source(data)
    if source.kind == "zip":
        sources.check_zip(source.path, data)
    elif source.kind == "folder":
        find_dataset_root(source.path)
    elif source.kind == "store":
        try:
            locate_dataset(source.location)
        except StoreFault as error:  # before any work: the user's setting, not a fault
            raise StoreError(str(error)) from None


def weights_for(models: Sequence[str], weights: str, transfer_image_size: int) -> str | None:
    """The weights the run will load: None when no model uses a frozen base, else a checked
    local file, or Keras's ImageNet file fetched now (so no network failure can stop the
    run half-way; the file then keys the cache by its content like any other).

    Raises:
        WeightsError: A file that is not MobileNetV2 no-top `.h5` weights, or ImageNet
            weights that cannot be downloaded.
    """
    if not any(catalog.spec(name).frozen_base for name in models):
        return None
    resolved = resolve_weights(weights)
    if resolved == "imagenet":
        from catdog.models import fetch_imagenet_weights

        return fetch_imagenet_weights(transfer_image_size)
    return resolved


def check_run_inputs(
    data: str, models: Sequence[str], weights: str, transfer_image_size: int
) -> str | None:
    """Every check a run makes before any work; returns `weights_for` the run."""
    for name in models:
        catalog.spec(name)
    check_data_source(data)
    return weights_for(models, weights, transfer_image_size)
