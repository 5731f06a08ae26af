"""Data-stage tasks: download, extract, manifest, split, counts, sample figures, decoding."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from catdog.config import PipelineConfig
from catdog.data import sources
from catdog.data.records import SPLITS, Manifest
from catdog.errors import TransientDownloadError
from catdog.hashing import HashMemo
from catdog.layout import Layout
from tasks import ui
from tasks.caching import ContentAddressed, stage_output

MAX_RETRY_AFTER_SECONDS = 60.0


def _source_fingerprint(inputs: dict[str, Any]) -> str:
    layout = Layout.at(inputs["artifacts"])
    source = sources.parse_source(inputs["data"])
    return sources.fingerprint(source, HashMemo(layout.hash_memo))


def _retry_transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry timeouts, dropped connections, 5xx and 429; never a 404 or a bad checksum."""
    try:
        state.result()
    except TransientDownloadError:
        return True
    except Exception:
        return False
    return False


def _portable(layout: Layout, path: Path) -> str:
    """A path relative to the artifacts folder when inside it, so the folder can move."""
    return layout.relative(path) if path.resolve().is_relative_to(layout.root) else str(path)


def _manifest(layout: Layout, record: dict[str, Any], name: str) -> Manifest:
    """Load a manifest, its images root resolved against the current artifacts folder."""
    manifest = Manifest.load(layout.resolve(record["dir"]) / name)
    return replace(manifest, root=str(layout.resolve(record["root"])))


def split_manifest_of(layout: Layout, split: dict[str, Any]) -> Manifest:
    """The split manifest that a `split_dataset` result points to."""
    return _manifest(layout, split, "split.json")


@task(
    name="download_dataset",
    cache_policy=ContentAddressed(
        stage="download",
        code=("catdog.data.download",),
        fingerprint=_source_fingerprint,
        unkeyed=("data",),  # the same archive, however its path is spelled, is one result
    ),
    retries=PipelineConfig.download_retries,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=_retry_transient_only,
)
def download_dataset(
    data: str, sha256: str | None, revision: str, artifacts: str
) -> dict[str, Any]:
    """Fetch the dataset archive (URL or local zip) into the artifacts, or note a folder."""
    from catdog.data.download import download_file
    from catdog.data.freshness import remember

    logger = get_run_logger()
    layout = Layout.at(artifacts)
    source = sources.parse_source(data)
    with stage_output(layout, "download") as (folder, record):
        record["kind"] = source.kind
        if source.kind == "folder":
            record["root"] = source.location
            # What identifies the data downstream: the folder and its listing.
            record["content"] = _source_fingerprint({"data": data, "artifacts": artifacts})
            return record
        if source.kind == "zip":
            sources.check_zip(source.path, data)
        partial = layout.output_dir("download", ".downloads") / f"{record['key']}.zip"
        partial.parent.mkdir(parents=True, exist_ok=True)
        url = data if source.kind == "url" else source.path.as_uri()
        try:
            download_file(url, partial, sha256=sha256)
        except TransientDownloadError as error:
            if error.retry_after:
                time.sleep(min(error.retry_after, MAX_RETRY_AFTER_SECONDS))
            raise
        shutil.move(partial, folder / "archive.zip")
        archive_hash = HashMemo(layout.hash_memo).sha256(folder / "archive.zip")
        # Later stages are keyed by the bytes, not by where they came from: two URLs (or a URL
        # and a local copy) that serve the same archive share everything downstream.
        record["content"] = f"sha256:{archive_hash}"
        logger.info(
            "dataset archive ready (%.1f MB)", (folder / "archive.zip").stat().st_size / 1e6
        )
    if source.kind == "url":
        remember(layout.sources_memo, data, revision, archive_hash)
    return record


@task(
    name="extract_dataset",
    cache_policy=ContentAddressed(stage="extract", code=("catdog.data.extract",)),
)
def extract_dataset(archive: dict[str, Any], artifacts: str) -> dict[str, Any]:
    """Unpack the archive safely; a folder source is used where it is."""
    from catdog.data.extract import extract_archive

    layout = Layout.at(artifacts)
    with stage_output(layout, "extract") as (folder, record):
        if archive["kind"] == "folder":
            record["root"] = archive["root"]
            return record
        extract_archive(layout.resolve(archive["dir"]) / "archive.zip", folder / "images")
    record["root"] = f"{record['dir']}/images"
    return record


@task(
    name="build_manifest",
    cache_policy=ContentAddressed(stage="manifest", code=("catdog.data.manifest",)),
)
def build_manifest(images: dict[str, Any], artifacts: str) -> dict[str, Any]:
    """List every image once, validated and hashed; unusable files are listed with a reason."""
    from catdog.data.manifest import build_manifest as scan

    logger = get_run_logger()
    layout = Layout.at(artifacts)
    manifest = scan(layout.resolve(images["root"]))
    with stage_output(layout, "manifest") as (folder, record):
        manifest.save(folder / "manifest.json")
        record.update(
            root=_portable(layout, Path(manifest.root)),
            layout=manifest.layout,
            classes=list(manifest.classes),
            images=len(manifest.images),
            skipped=len(manifest.skipped),
            manifest_hash=manifest.content_hash(),
        )
    for skipped in manifest.skipped:
        logger.warning("skipped %s: %s", skipped.path, skipped.reason)
    logger.info(
        "%d images in %d classes (%s), %d skipped",
        len(manifest.images),
        len(manifest.classes),
        ", ".join(manifest.classes),
        len(manifest.skipped),
    )
    return record


@task(
    name="split_dataset", cache_policy=ContentAddressed(stage="split", code=("catdog.data.split",))
)
def split_dataset(
    manifest: dict[str, Any],
    seed: int,
    test_fraction: float,
    flat_fractions: list[float],
    max_images_per_class: int | None,
    artifacts: str,
) -> dict[str, Any]:
    """Assign every image to train, validation or test, deterministically for the seed."""
    from catdog.data.split import split_manifest

    layout = Layout.at(artifacts)
    split = split_manifest(
        _manifest(layout, manifest, "manifest.json"),
        seed=seed,
        test_fraction=test_fraction,
        flat_fractions=tuple(flat_fractions),
        max_images_per_class=max_images_per_class,
    )
    with stage_output(layout, "split") as (folder, record):
        split.save(folder / "split.json")
        record.update(
            root=manifest["root"],
            classes=list(split.classes),
            sizes={name: len(split.in_split(name)) for name in SPLITS},
            split_hash=split.content_hash(),
            skipped=[{"path": s.path, "reason": s.reason} for s in split.skipped],
        )
    return record


@task(
    name="count_labels", cache_policy=ContentAddressed(stage="count", code=("catdog.data.counts",))
)
def count_labels(split: dict[str, Any], artifacts: str) -> dict[str, Any]:
    """Images per class and split, and the majority-class baseline accuracy."""
    from catdog.data.counts import count_labels as count

    logger = get_run_logger()
    layout = Layout.at(artifacts)
    counts = count(split_manifest_of(layout, split)).to_json()
    with stage_output(layout, "count") as (folder, record):
        (folder / "counts.json").write_text(json.dumps(counts, indent=2))
        record.update(counts)
    if counts.get("imbalance_warning"):
        logger.warning(counts["imbalance_warning"])
    ui.publish_counts(counts)
    return record


@task(
    name="plot_samples",
    cache_policy=ContentAddressed(stage="plot", code=("catdog.plots", "catdog.data.samples")),
)
def plot_samples(
    split: dict[str, Any], seed: int, image_size: int, artifacts: str
) -> dict[str, Any]:
    """The blog's grid (3 images per class) and an augmentation preview, as PNGs."""
    from catdog.data.samples import augmentation_views, pick_samples
    from catdog.plots import augmentation_preview, sample_grid, save_figure

    layout = Layout.at(artifacts)
    manifest = split_manifest_of(layout, split)
    samples = pick_samples(manifest, per_class=3, seed=seed, size=image_size)
    first = next(iter(samples.values()))[0]
    with stage_output(layout, "plot") as (folder, record):
        save_figure(sample_grid(samples), folder / "samples.png")
        save_figure(
            augmentation_preview(first, augmentation_views(first, draws=6, seed=seed)),
            folder / "augmentation.png",
        )
    out = layout.resolve(record["dir"])
    ui.publish_image("sample-grid", out / "samples.png", "Three random training images per class")
    ui.publish_image(
        "augmentation-preview", out / "augmentation.png", "RandomFlip + RandomRotation, 6 draws"
    )
    return record


@task(
    name="decode_images",
    task_run_name="decode_images[{image_size}]",
    cache_policy=ContentAddressed(stage="decode", code=("catdog.data.images", "catdog.arrays")),
)
def decode_images(split: dict[str, Any], image_size: int, artifacts: str) -> dict[str, Any]:
    """Decode every image once into uint8 arrays on disk, reused by every model and epoch."""
    from catdog.arrays import require_space
    from catdog.data.images import decode_split_to, split_bytes

    layout = Layout.at(artifacts)
    manifest = split_manifest_of(layout, split)
    started = time.perf_counter()
    with stage_output(layout, "decode") as (folder, record):
        require_space(folder, split_bytes(manifest, image_size), "decode_images")
        for name in SPLITS:
            decode_split_to(manifest, name, image_size, folder)
        record.update(
            image_size=image_size,
            classes=list(manifest.classes),
            seconds=time.perf_counter() - started,
        )
    return record
