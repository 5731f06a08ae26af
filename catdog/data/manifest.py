"""Build the manifest: every image under a dataset root, validated and hashed exactly once."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from catdog.data.extract import IMAGE_SUFFIXES, find_dataset_root, is_litter, split_folders
from catdog.data.records import SPLITS, ImageEntry, Manifest, SkippedFile
from catdog.hashing import HashMemo

__all__ = ["IMAGE_SUFFIXES", "KnownImages", "build_manifest"]

logger = logging.getLogger(__name__)

# JPEGs are decoded at a reduced scale (libjpeg's DCT scaling) for validation: it still reads
# every byte of the entropy-coded data, so truncation is caught, at a fraction of the cost.
_DRAFT_SIZE = 256
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class _Candidate:
    path: str  # a string until read: a folder may hold 100,000 images
    rel: str
    class_name: str
    source_split: str | None


@dataclass(frozen=True)
class _Checked:
    candidate: _Candidate
    sha256: str | None  # None when the file could not be read
    problem: str | None  # why the file is unusable, None if it is a good image
    validated: bool = True  # decoded by this run (False: its content's verdict was known)
    read: bool = True  # its bytes were read (False: its size and time were those remembered)


SETTLED_NS = 2_000_000_000
# Images validated per sealed batch of verdicts: a run stopped midway keeps what it checked.
VALIDATION_BATCH = 2048


@dataclass
class KnownImages:
    """What earlier runs learned about image files, so that this one reads only what changed.

    A file whose size and time are those `memo` remembers is not read at all; a content whose
    verdict is in `verdicts` (by SHA-256: None for a good image, else why it is not) is not
    decoded again, wherever its file now lies. `keep` receives each batch of new verdicts as
    (SHA-256, verdict) pairs, to seal them for later runs.
    """

    memo: HashMemo | None = None
    verdicts: Mapping[str, str | None] = field(default_factory=dict)
    keep: Callable[[list[tuple[str, str | None]]], None] | None = None
    read: int = 0  # files whose bytes this run read: new, or changed since the last look
    validated: int = 0  # images decoded to validate them
    reused: int = 0  # images whose verdict was known


def _reason(prefix: str, exc: BaseException) -> str:
    # Reasons end up in the manifest's content hash, so strip anything run-dependent
    # (Pillow sometimes names the BytesIO object with its memory address).
    text = _ADDRESS.sub("", str(exc)).strip() or type(exc).__name__
    return f"{prefix}: {text}"


def _check_image(data: bytes) -> str | None:
    """Why `data` is not a usable image, or None if it decodes fully and converts to RGB."""
    if not data:
        return "empty file"
    try:
        with warnings.catch_warnings():
            # A huge image is still a valid one; the hard limit (DecompressionBombError,
            # caught below) applies above twice Image.MAX_IMAGE_PIXELS.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (_DRAFT_SIZE, _DRAFT_SIZE))
                img.load()
                if img.mode != "RGB":
                    img.convert("RGB")
    except UnidentifiedImageError:
        return "not an image: cannot identify image file"
    except Image.DecompressionBombError as exc:
        return _reason("image too large", exc)
    except Exception as exc:
        # Pillow reports damaged files through many exception types (OSError, SyntaxError,
        # ValueError, struct.error, EOFError...); one bad file must not stop the whole run.
        return _reason("truncated or corrupt image", exc)
    return None


def _recall(candidates: Sequence[_Candidate], known: KnownImages) -> list[_Checked | None]:
    """The verdict of each file whose stamp and content are both known, without reading it;
    None for the others."""
    if known.memo is None:
        return [None] * len(candidates)
    digests = known.memo.known_all([candidate.path for candidate in candidates])
    verdicts = known.verdicts
    return [
        _Checked(candidate, digest, verdicts[digest], validated=False, read=False)
        if digest is not None and digest in verdicts
        else None
        for candidate, digest in zip(candidates, digests, strict=True)
    ]


def _check(candidate: _Candidate, known: KnownImages) -> _Checked:
    try:
        stat = os.stat(candidate.path)
        # Read once, then hash and decode the same bytes: half the I/O of hashing separately.
        data = Path(candidate.path).read_bytes()
    except OSError as exc:
        logger.warning("cannot read %s: %s", candidate.path, exc)
        return _Checked(candidate, None, f"cannot read file: {exc.strerror or exc}")
    digest = hashlib.sha256(data).hexdigest()
    # A file modified within the last seconds may change again within its time's resolution
    # without its stamp changing: it is read again next time.
    if known.memo is not None and time.time_ns() - stat.st_mtime_ns > SETTLED_NS:
        known.memo.note(candidate.path, digest, stat)
    if digest in known.verdicts:
        return _Checked(candidate, digest, known.verdicts[digest], validated=False)
    return _Checked(candidate, digest, _check_image(data))


def _check_all(
    candidates: Sequence[_Candidate], known: KnownImages, workers: int
) -> list[_Checked]:
    """Check every candidate: those known without reading them here, the others read and
    decoded in a thread pool, their new verdicts sealed by batches."""
    checked = _recall(candidates, known)
    unknown = [i for i, found in enumerate(checked) if found is None]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(unknown), VALIDATION_BATCH):
            batch = unknown[start : start + VALIDATION_BATCH]
            results = list(pool.map(lambda i: _check(candidates[i], known), batch))
            for i, result in zip(batch, results, strict=True):
                checked[i] = result
            new = [(r.sha256, r.problem) for r in results if r.validated and r.sha256 is not None]
            if known.keep is not None and new:
                known.keep(new)
    if known.memo is not None:  # once: a run stopped before just reads those files again
        known.memo.save()
    done = [found for found in checked if found is not None]
    known.validated += sum(1 for c in done if c.validated and c.sha256 is not None)
    known.reused += sum(1 for c in done if not c.validated)
    known.read += sum(1 for c in done if c.read)
    return done


def _list_class_folder(
    root: Path, folder: Path, class_name: str, source_split: str | None
) -> tuple[list[_Candidate], list[SkippedFile]]:
    """Every image file under `folder` (recursively, sorted) and the non-image files found."""
    candidates: list[_Candidate] = []
    skipped: list[SkippedFile] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        # Hidden folders (.ipynb_checkpoints) and __MACOSX hold tool state, not images.
        dirnames[:] = sorted(d for d in dirnames if not (d.startswith(".") or is_litter(d)))
        # Strings, not Path objects, until a file is kept: a folder may hold 100,000 images.
        base = os.path.relpath(dirpath, root).replace(os.sep, "/")
        prefix = "" if base == "." else f"{base}/"
        folder = os.path.join(dirpath, "")  # joined by hand below: 30,000 joins cost 0.03 s
        for name in sorted(filenames):
            if is_litter(name):
                continue
            path = folder + name
            rel = prefix + name
            suffix = os.path.splitext(name)[1].lower()
            if suffix not in IMAGE_SUFFIXES:
                shown = f"suffix {suffix}" if suffix else "no suffix"
                skipped.append(SkippedFile(rel, f"not an image file ({shown})"))
                continue
            candidates.append(_Candidate(path, rel, class_name, source_split))
    return candidates, skipped


def build_manifest(
    folder: Path, *, workers: int | None = None, known: KnownImages | None = None
) -> Manifest:
    """List, validate and hash every image of the dataset in `folder`.

    The dataset root and layout are found with `find_dataset_root`. Every image file is read
    once, hashed (SHA-256) and fully decoded with Pillow in a thread pool (Pillow releases the
    GIL while decoding). Unusable files are listed in `skipped` with a reason: non-image
    suffixes, empty files, content that is not an image, truncated or corrupt images.
    Identical content is kept once only: the first copy in the order train, validation, test,
    then path, so the same picture can never sit in two splits; later copies are skipped as
    "duplicate of <path>".

    Args:
        folder: An extracted archive or an image folder (the root or its parent).
        workers: Threads used for validation; default `min(32, cpu_count + 4)`.
        known: What earlier runs learned (see `KnownImages`), updated with what this one did;
            without it every file is read and decoded.

    Returns:
        An unsplit manifest (`split` is None) with entries sorted by path.

    Raises:
        DataError: No dataset layout is found (see `find_dataset_root`).
    """
    root, layout, classes = find_dataset_root(Path(folder))
    root = root.resolve()
    if layout == "single_root":
        sources: list[tuple[str | None, Path]] = [(None, root)]
    else:
        found = split_folders(root)
        sources = [(split, found[split]) for split in SPLITS if split in found]

    candidates: list[_Candidate] = []
    skipped: list[SkippedFile] = []
    for source_split, base in sources:
        for class_name in classes:
            found_images, found_skipped = _list_class_folder(
                root, base / class_name, class_name, source_split
            )
            candidates.extend(found_images)
            skipped.extend(found_skipped)

    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    # Truncated files must fail to load rather than be padded with grey. The flag is global
    # to Pillow, so restore whatever the caller had set.
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        checked = _check_all(candidates, known if known is not None else KnownImages(), workers)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous

    split_rank = {split: rank for rank, split in enumerate(SPLITS)}
    checked.sort(
        key=lambda c: (split_rank.get(c.candidate.source_split or "", -1), c.candidate.rel)
    )
    label = {name: index for index, name in enumerate(classes)}
    first_seen: dict[str, str] = {}
    images: list[ImageEntry] = []
    for item in checked:
        candidate = item.candidate
        if item.problem is not None or item.sha256 is None:
            skipped.append(SkippedFile(candidate.rel, item.problem or "unreadable"))
            continue
        if item.sha256 in first_seen:
            skipped.append(SkippedFile(candidate.rel, f"duplicate of {first_seen[item.sha256]}"))
            continue
        first_seen[item.sha256] = candidate.rel
        images.append(
            ImageEntry(
                path=candidate.rel,
                label=label[candidate.class_name],
                class_name=candidate.class_name,
                sha256=item.sha256,
                source_split=candidate.source_split,
            )
        )

    images.sort(key=lambda entry: entry.path)
    skipped.sort(key=lambda entry: entry.path)
    if skipped:
        logger.warning(
            "%s: %d images usable, %d files skipped (first: %s: %s)",
            root,
            len(images),
            len(skipped),
            skipped[0].path,
            skipped[0].reason,
        )
    else:
        logger.info("%s: %d images usable, none skipped", root, len(images))
    return Manifest(
        root=str(root),
        layout=layout,
        classes=classes,
        images=tuple(images),
        skipped=tuple(skipped),
    )


def changes(previous: Manifest, current: Manifest) -> dict[str, int]:
    """What changed in the usable images from `previous` to `current`, by content: new
    images, changed ones (a path whose content differs), moved ones (a content now at another
    path: a rename, or a relabel between class folders) and removed ones."""
    before = {entry.path: entry.sha256 for entry in previous.images}
    where = {entry.sha256: entry.path for entry in previous.images}
    after = {entry.path: entry.sha256 for entry in current.images}
    now = set(after.values())
    counts = {"new": 0, "changed": 0, "moved": 0, "removed": 0}
    for path, digest in after.items():
        if digest in where:
            counts["moved"] += where[digest] != path
        elif path in before:
            counts["changed"] += 1
        else:
            counts["new"] += 1
    counts["removed"] = sum(
        1 for path, digest in before.items() if digest not in now and path not in after
    )
    return counts
