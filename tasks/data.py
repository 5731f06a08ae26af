"""Data-stage tasks: download, extract, manifest, split, counts, sample figures, decoding."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.tasks import exponential_backoff

from catdog.config import RUN
from catdog.data import sources
from catdog.data.records import SPLITS, ImageEntry, Manifest, load_manifest
from catdog.data.store_source import (
    LISTING_FILE,
    SourceMirror,
    is_store_folder,
    listing_fingerprint,
    locate_dataset,
)
from catdog.errors import TransientDownloadError
from catdog.hashing import HashMemo
from catdog.io import atomic_write_json, read_json
from catdog.layout import MANIFEST_FILE, NEAR_DUPLICATES_FILE, SPLIT_FILE, Layout
from catdog.pieces import Reuse
from catdog.stage_records import (
    ArchiveRecord,
    ArraysRecord,
    CountsRecord,
    FiguresRecord,
    ImagesRecord,
    InspectionRecord,
    ManifestRecord,
    SplitRecord,
)
from tasks import ui
from tasks.caching import current_key, raised, stage_output, stage_task

MAX_RETRY_AFTER_SECONDS = 60.0


# A fingerprint reads the task's inputs by parameter name, as the cache policy hands them over
# (a dict of every type the task takes).
def _source_fingerprint(inputs: dict[str, Any]) -> str:
    layout = Layout.at(inputs["artifacts"])
    source = sources.parse_source(inputs["data"])
    return sources.fingerprint(source, HashMemo(layout.hash_memo))


def _retry_transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry timeouts, dropped connections, 5xx and 429; never a 404 or a bad checksum."""
    return isinstance(raised(state), TransientDownloadError)


def _portable(layout: Layout, path: Path) -> str:
    """A path relative to the artifacts folder when inside it, so the folder can move."""
    return layout.relative(path) if path.resolve().is_relative_to(layout.root) else str(path)


def images_folder(layout: Layout, root: str) -> Path:
    """Where the images of a record's `root` are on this host: under the artifacts, a folder
    used in place, or this host's mirror of a folder in an object store."""
    return SourceMirror(root).folder if is_store_folder(root) else layout.resolve(root)


def fetch_images(
    layout: Layout, record: ManifestRecord | SplitRecord, entries: Iterable[ImageEntry]
) -> None:
    """The images of `entries`, present on this host before a stage reads them: for a folder
    in an object store, those its mirror lacks are fetched (checked against their hashes);
    others are local files already."""
    if is_store_folder(record.root):
        wanted = [(entry.path, entry.sha256) for entry in entries]
        SourceMirror(record.root).ensure(wanted, HashMemo(layout.image_hashes))


def _manifest(layout: Layout, record: ManifestRecord | SplitRecord, name: str) -> Manifest:
    """Load a manifest, its images root resolved on this host (`images_folder`)."""
    manifest = load_manifest(layout.resolve(record.dir) / name)
    return replace(manifest, root=str(images_folder(layout, record.root)))


def manifest_of(layout: Layout, manifest: ManifestRecord) -> Manifest:
    """The manifest that a `build_manifest` record points to."""
    return _manifest(layout, manifest, MANIFEST_FILE)


def near_duplicates_of(layout: Layout, inspection: InspectionRecord) -> list[list[str]]:
    """The near-duplicate groups an `inspect_images` record found (paths)."""
    return json.loads((layout.resolve(inspection.dir) / NEAR_DUPLICATES_FILE).read_text())


def split_manifest_of(layout: Layout, split: SplitRecord) -> Manifest:
    """The split manifest that a `split_dataset` record points to."""
    return _manifest(layout, split, SPLIT_FILE)


@stage_task(
    "download",
    fingerprint=_source_fingerprint,
    unkeyed=("data",),  # the same archive, however its path is spelled, is one result
    retries=RUN.download_retries,  # the flow sets its own (`--download-retries`)
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=_retry_transient_only,
)
def download_dataset(data: str, sha256: str | None, revision: str, artifacts: str) -> ArchiveRecord:
    """Fetch the dataset archive (URL or local zip) into the artifacts, or note a folder."""
    from catdog.data.download import download_file
    from catdog.data.freshness import remember

    logger = get_run_logger()
    layout = Layout.at(artifacts)
    source = sources.parse_source(data)
    with stage_output(layout) as out:
        out.facts.update(kind=source.kind, source=data)
        if source.kind == "store":
            # The listing only: each host that reads the images mirrors them (catdog.data.
            # store_source), fetching only the objects whose ETag it has not fetched.
            root, listing = locate_dataset(source.location)
            atomic_write_json(out.folder / LISTING_FILE, listing, compact=True)
            # Used in place, as a local folder is: where it is belongs to what it is.
            out.facts.update(root=root, content=f"{root}:{listing_fingerprint(listing)}")
            logger.info("%s: %d images listed", root, len(listing))
        elif source.kind == "folder":
            # What identifies the data downstream: the folder and its listing.
            out.facts.update(
                root=source.location,
                content=_source_fingerprint({"data": data, "artifacts": artifacts}),
            )
        else:
            if source.kind == "zip":
                sources.check_zip(source.path, data)
            # Named by the key, so that a retry resumes the part file an earlier try left.
            partial = layout.output_dir("download", ".downloads") / f"{current_key()}.zip"
            partial.parent.mkdir(parents=True, exist_ok=True)
            url = data if source.kind == "url" else source.path.as_uri()
            try:
                download_file(url, partial, sha256=sha256)
            except TransientDownloadError as error:
                if error.retry_after:
                    time.sleep(min(error.retry_after, MAX_RETRY_AFTER_SECONDS))
                raise
            shutil.move(partial, out.folder / "archive.zip")
            # Later stages are keyed by the bytes, not by where they came from.
            archive_hash = HashMemo(layout.hash_memo).sha256(out.folder / "archive.zip")
            out.facts["content"] = f"sha256:{archive_hash}"
            logger.info(
                "dataset archive ready (%.1f MB)",
                (out.folder / "archive.zip").stat().st_size / 1e6,
            )
    record: ArchiveRecord = out.record
    if source.kind == "url":
        remember(layout.sources_memo, data, revision, record.content.removeprefix("sha256:"))
    return record


@stage_task("extract")
def extract_dataset(archive: ArchiveRecord, artifacts: str) -> ImagesRecord:
    """Unpack the archive safely; a folder source is used where it is."""
    from catdog.data.extract import extract_archive

    layout = Layout.at(artifacts)
    with stage_output(layout) as out:
        if archive.kind == "store":
            shutil.copy(layout.resolve(archive.dir) / LISTING_FILE, out.folder / LISTING_FILE)
            out.facts["root"] = archive.root
        elif archive.kind == "folder":
            out.facts["root"] = archive.root
        else:
            extract_archive(
                layout.resolve(archive.dir) / "archive.zip",
                out.folder / "images",
                name=f"--data {archive.source}" if archive.source else None,
            )
            out.facts["root"] = (
                f"{layout.relative(layout.output_dir('extract', current_key()))}/images"
            )
    return out.record


@stage_task("manifest")
def build_manifest(images: ImagesRecord, artifacts: str) -> ManifestRecord:
    """List every image once, validated and hashed; unusable files are listed with a reason."""
    from catdog.data.manifest import KnownImages
    from catdog.data.manifest import build_manifest as scan
    from catdog.pieces import validation_pieces

    logger = get_run_logger()
    layout = Layout.at(artifacts)
    verdicts = validation_pieces(layout.pieces_dir, HashMemo(layout.hash_memo))
    known = KnownImages(
        memo=HashMemo(layout.image_hashes), verdicts=verdicts.values(), keep=verdicts.add_values
    )
    with stage_output(layout) as out:
        fetched = None
        if is_store_folder(images.root):
            listing = read_json(layout.resolve(images.dir) / LISTING_FILE)
            fetched = SourceMirror(images.root).sync(listing)
        manifest = scan(images_folder(layout, images.root), known=known)
        manifest_hash = manifest.save(out.folder / MANIFEST_FILE)
        out.facts.update(
            root=images.root if fetched is not None else _portable(layout, Path(manifest.root)),
            objects_fetched=fetched,
            layout=manifest.layout,
            classes=list(manifest.classes),
            images=len(manifest.images),
            skipped=len(manifest.skipped),
            manifest_hash=manifest_hash,
            per_image=Reuse(known.validated, known.reused).to_json(),
            files_read=known.read,
            pieces=[layout.relative(verdicts.folder)],
        )
    logger.info(
        "%d images in %d classes (%s), %d skipped; %d files read, %d validated, %d known",
        len(manifest.images),
        len(manifest.classes),
        ", ".join(manifest.classes),
        len(manifest.skipped),
        known.read,
        known.validated,
        known.reused,
    )
    return out.record


def _near_duplicates_fingerprint(inputs: dict[str, Any]) -> str | None:
    """The split depends on the groups the inspection found, not on how they were found:
    editing the data checks' code must not re-split the data and retrain every model."""
    inspection: InspectionRecord = inputs["inspection"]
    return inspection.files.get(NEAR_DUPLICATES_FILE)


@stage_task("split", fingerprint=_near_duplicates_fingerprint, unkeyed=("inspection",))
def split_dataset(
    manifest: ManifestRecord,
    inspection: InspectionRecord,
    seed: int,
    test_fraction: float,
    flat_fractions: list[float],
    max_images_per_class: int | None,
    artifacts: str,
) -> SplitRecord:
    """Assign every image to train, validation or test, deterministically for the seed; each
    group of near-duplicates to one split."""
    from catdog.data.split import split_manifest

    layout = Layout.at(artifacts)
    with stage_output(layout) as out:
        split = split_manifest(
            manifest_of(layout, manifest),
            near_duplicates=near_duplicates_of(layout, inspection),
            seed=seed,
            test_fraction=test_fraction,
            flat_fractions=tuple(flat_fractions),
            max_images_per_class=max_images_per_class,
        )
        split_hash = split.save(out.folder / SPLIT_FILE)
        out.facts.update(
            root=manifest.root,
            classes=list(split.classes),
            sizes={name: len(split.in_split(name)) for name in SPLITS},
            split_hash=split_hash,
            skipped=[{"path": s.path, "reason": s.reason} for s in split.skipped],
        )
    return out.record


@stage_task("count")
def count_labels(split: SplitRecord, artifacts: str) -> CountsRecord:
    """Images per class and split, and the majority-class baseline accuracy."""
    from catdog.data.counts import count_labels as count

    layout = Layout.at(artifacts)
    with stage_output(layout) as out:
        counts = count(split_manifest_of(layout, split)).to_json()
        (out.folder / "counts.json").write_text(json.dumps(counts, indent=2))
        out.facts.update(counts)
    ui.publish_counts(out.record)
    return out.record


def _samples_fingerprint(inputs: dict[str, Any]) -> list[Any]:
    """The figures depend on the images they show, not on the whole split: a split that grew
    keeps its figures until a new image ranks among those shown."""
    from catdog.data.samples import sample_entries

    layout = Layout.at(inputs["artifacts"])
    manifest = split_manifest_of(layout, inputs["split"])
    shown = sample_entries(manifest, per_class=inputs["per_class"], seed=inputs["seed"])
    return [list(manifest.classes), {name: [e.sha256 for e in of] for name, of in shown.items()}]


@stage_task("plot", fingerprint=_samples_fingerprint, unkeyed=("split",))
def plot_samples(
    split: SplitRecord, seed: int, image_size: int, per_class: int, draws: int, artifacts: str
) -> FiguresRecord:
    """The blog's grid (3 images per class) and an augmentation preview, as PNGs."""
    from catdog.data.samples import (
        AUGMENTATION_FIGURE,
        SAMPLES_FIGURE,
        augmentation_views,
        pick_samples,
        sample_entries,
    )
    from catdog.plots import augmentation_preview, sample_grid, save_figure

    layout = Layout.at(artifacts)
    with stage_output(layout) as out:
        manifest = split_manifest_of(layout, split)
        shown = sample_entries(manifest, per_class=per_class, seed=seed)
        fetch_images(layout, split, chain(*shown.values()))
        samples = pick_samples(manifest, per_class=per_class, seed=seed, size=image_size)
        first = next(iter(samples.values()))[0]
        save_figure(sample_grid(samples), out.folder / SAMPLES_FIGURE)
        save_figure(
            augmentation_preview(first, augmentation_views(first, draws=draws, seed=seed)),
            out.folder / AUGMENTATION_FIGURE,
        )
    figures = layout.resolve(out.record.dir)
    ui.publish_image(
        "sample-grid",
        figures / SAMPLES_FIGURE,
        f"{per_class} random training images per class",
    )
    ui.publish_image(
        "augmentation-preview",
        figures / AUGMENTATION_FIGURE,
        f"RandomFlip + RandomRotation, {draws} draws",
    )
    return out.record


@stage_task("decode")
def decode_images(split: SplitRecord, image_size: int, artifacts: str) -> ArraysRecord:
    """Decode every image once into uint8 arrays on disk, reused by every model and epoch."""
    from catdog.data.images import decode_splits_to
    from catdog.pieces import pixel_pieces

    layout = Layout.at(artifacts)
    pixels = pixel_pieces(layout.pieces_dir, image_size, HashMemo(layout.hash_memo))
    with stage_output(layout) as out:
        manifest = split_manifest_of(layout, split)
        if is_store_folder(split.root):
            located = pixels.locate()
            missing = [e for e in manifest.images if e.split and e.sha256 not in located]
            fetch_images(layout, split, missing)
        decoded = decode_splits_to(manifest, image_size, out.folder, pixels)
        out.facts.update(
            image_size=image_size,
            classes=list(manifest.classes),
            per_image=decoded.reuse.to_json(),
            pieces=[layout.relative(pixels.folder)],
            piece_files={layout.relative(path): sha for path, sha in decoded.packs.items()},
        )
    return out.record
