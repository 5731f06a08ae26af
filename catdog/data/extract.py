"""Unpack a dataset archive safely and find the image-folder dataset inside it.

Archives come from the internet or from users, so every member is checked before a single
byte is written: no path may leave the destination, no links, no zip bombs. Extraction goes
into a temporary sibling folder that only becomes `dest` once everything succeeded.
"""

from __future__ import annotations

import logging
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from catdog.errors import ArchiveError, DataError
from catdog.io import atomic_directory

logger = logging.getLogger(__name__)

# Suffixes Pillow decodes that we accept as images (compared lower-cased). Defined here rather
# than in manifest.py because find_dataset_root needs it and manifest.py imports this module.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})

# Files and folders that operating systems and tools drop into archives and folders; they are
# never part of a dataset, so they are ignored without being reported.
_LITTER_DIRS = frozenset({"__MACOSX"})
_LITTER_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})

# Compression-ratio checks only apply to members at least this large: tiny files (a blank
# text file, a 1 KiB solid-colour PNG) legitimately compress far more than 200x, and cannot
# do harm however well they compress.
_RATIO_MIN_BYTES = 1 << 20
_COPY_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")

_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


@dataclass(frozen=True)
class ExtractLimits:
    """Limits that make an archive count as hostile (a zip bomb or an absurd dataset)."""

    max_total_bytes: int = 20 * 1024**3  # total uncompressed size of everything extracted
    max_compression_ratio: float = 200.0  # per member of more than 1 MiB uncompressed
    max_members: int = 1_000_000  # entries in the archive, folders included


def is_litter(name: str) -> bool:
    """Whether a file or folder name is OS or tool litter (`.DS_Store`, `._x`, `__MACOSX`).

    Args:
        name: A single path component (not a path).

    Returns:
        True if the entry should be ignored entirely.
    """
    return name in _LITTER_FILES or name in _LITTER_DIRS or name.startswith("._")


def _is_litter_dir(name: str) -> bool:
    # Hidden folders (.git, .ipynb_checkpoints) hold tool state, never class images.
    return name in _LITTER_DIRS or name.startswith(".")


def _member_parts(archive: str, info: zipfile.ZipInfo) -> tuple[str, ...]:
    """The member's path components, or ArchiveError if the name could escape `dest`."""
    name = info.filename
    # Some Windows tools write backslashes; on POSIX they would silently become part of a file
    # name, so treat them as separators both for the safety check and for extraction.
    normalised = name.replace("\\", "/")
    if normalised.startswith("/"):
        raise ArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    if _DRIVE.match(normalised):
        raise ArchiveError(f"{archive}: member {name!r} has a drive letter; refusing to extract")
    parts = tuple(part for part in normalised.split("/") if part not in ("", "."))
    if ".." in parts:
        raise ArchiveError(
            f"{archive}: member {name!r} contains '..' and would be written outside the "
            "destination folder; refusing to extract"
        )
    return parts


def _check_member_type(archive: str, info: zipfile.ZipInfo) -> None:
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if stat.S_ISLNK(mode):
        raise ArchiveError(
            f"{archive}: member {info.filename!r} is a symbolic link; refusing to extract "
            "(links can point outside the destination folder)"
        )
    # A mode of 0 (archives made on Windows) means "regular file"; anything else that is not a
    # file or folder (device, FIFO, socket) has no business in a dataset.
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise ArchiveError(
            f"{archive}: member {info.filename!r} is a special file (mode {oct(mode)}); "
            "refusing to extract"
        )
    if info.flag_bits & 0x1:
        raise ArchiveError(f"{archive}: member {info.filename!r} is encrypted; cannot extract")


def _open_zip(archive: Path) -> zipfile.ZipFile:
    """Open `archive`, turning every way it can fail into an ArchiveError that says why."""
    if not archive.is_file():
        raise ArchiveError(f"{archive} does not exist or is not a file")
    with open(archive, "rb") as handle:
        head = handle.read(64)
    if not head:
        raise ArchiveError(f"{archive} is empty (0 bytes), not a zip archive")
    # Every zip starts with a local file header, or with the end record if it is empty. A
    # missing signature usually means an HTML error page or a different format was saved.
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise ArchiveError(f"{archive} is not a zip archive (starts with {head[:16]!r})")
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        # It starts like a zip, so the end (the central directory) is missing or damaged:
        # typically an interrupted download.
        raise ArchiveError(f"{archive} is truncated or corrupt: {exc}") from exc


def _check_conflicts(
    archive: str,
    info: zipfile.ZipInfo,
    parts: tuple[str, ...],
    files: dict[tuple[str, ...], str],
    folders: dict[tuple[str, ...], str],
) -> None:
    """Refuse a member that repeats a file or is both a file and a folder; record it."""
    # Two members writing one path make the result depend on extraction order; a file where
    # a folder is needed makes extraction fail half-way. Both only occur in crafted archives.
    parents = [parts[:depth] for depth in range(1, len(parts))]
    clash = files.get(parts) or next((files[p] for p in parents if p in files), None)
    if clash is None and not info.is_dir():
        clash = folders.get(parts)
    if clash is not None:
        raise ArchiveError(
            f"{archive}: member {info.filename!r} conflicts with member {clash!r} (same path, "
            "or a file where a folder is needed); refusing to extract an ambiguous archive"
        )
    for parent in parents:
        folders.setdefault(parent, info.filename)
    if info.is_dir():
        folders.setdefault(parts, info.filename)
    else:
        files[parts] = info.filename


def _plan(
    archive: str, zf: zipfile.ZipFile, limits: ExtractLimits
) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """Check every member and list those to extract; raise before anything is written."""
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise ArchiveError(
            f"{archive} has {len(infos)} members, more than the limit of {limits.max_members}; "
            "refusing to extract"
        )
    plan: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
    files: dict[tuple[str, ...], str] = {}
    folders: dict[tuple[str, ...], str] = {}
    total = 0
    for info in infos:
        # Litter is checked too: a hostile name is hostile wherever it sits.
        parts = _member_parts(archive, info)
        _check_member_type(archive, info)
        if not parts or any(is_litter(part) for part in parts):
            continue
        _check_conflicts(archive, info, parts, files, folders)
        if not info.is_dir():
            if (
                info.file_size > _RATIO_MIN_BYTES
                and info.file_size > limits.max_compression_ratio * max(info.compress_size, 1)
            ):
                ratio = info.file_size / max(info.compress_size, 1)
                raise ArchiveError(
                    f"{archive}: member {info.filename!r} expands {ratio:.0f}x "
                    f"({info.compress_size} -> {info.file_size} bytes), more than the limit of "
                    f"{limits.max_compression_ratio:g}x; refusing to extract a likely zip bomb"
                )
            total += info.file_size
            if total > limits.max_total_bytes:
                raise ArchiveError(
                    f"{archive} unpacks to more than {limits.max_total_bytes} bytes "
                    f"(limit reached at member {info.filename!r}); refusing to extract"
                )
        plan.append((info, parts))
    return plan


def _copy_limited(source: IO[bytes], target: IO[bytes], limit: int, what: str) -> int:
    """Copy at most `limit` bytes; raise ArchiveError as soon as the source yields more.

    Guards against a header that declares a small size for a member that inflates to much
    more: the declared sizes were checked, so the actual bytes must not exceed them.
    """
    written = 0
    while chunk := source.read(_COPY_CHUNK):
        written += len(chunk)
        if written > limit:
            raise ArchiveError(
                f"{what} produces more bytes than its header declares ({limit}); refusing "
                "to extract a likely zip bomb"
            )
        target.write(chunk)
    return written


def extract_archive(
    archive: Path, dest: Path, limits: ExtractLimits = ExtractLimits(), *, name: str | None = None
) -> Path:
    """Safely extract a zip archive into `dest`.

    All members are checked before anything is written; the archive is extracted into a
    temporary folder beside `dest` that is renamed to `dest` only on success, so a failure
    leaves nothing half-extracted behind. OS litter (`__MACOSX/`, `.DS_Store`, `Thumbs.db`,
    `._*`) is not extracted. If `dest` already exists as a non-empty folder (the same
    content-addressed extraction finished earlier or concurrently), the archive is still
    checked but the existing folder is kept as it is.

    Args:
        archive: Path of the zip file.
        dest: Folder to create with the archive's content.
        limits: Size, compression-ratio and member-count limits (zip-bomb protection).
        name: What to call the archive in messages (where the user's copy came from);
            default its path.

    Returns:
        `dest`.

    Raises:
        ArchiveError: The file is not a zip, is truncated or corrupt (including bad CRCs), or
            is hostile: absolute paths, drive letters, `..` components, links or special
            files, encrypted, repeated or conflicting members, or a member count, total size
            or compression ratio over `limits`; or `dest` exists as a file.
    """
    archive = Path(archive)
    dest = Path(dest)
    shown = name or str(archive)
    with _open_zip(archive) as zf:
        plan = _plan(shown, zf, limits)
        if dest.is_dir() and any(dest.iterdir()):
            logger.info("%s already holds an extraction of %s; keeping it", dest, archive.name)
            return dest
        if dest.exists() and not dest.is_dir():
            raise ArchiveError(f"cannot extract {shown} to {dest}: a file of that name exists")
        if dest.is_dir():
            # An empty folder (made by a user or a tool) would block the final rename.
            dest.rmdir()
        written_total = 0
        with atomic_directory(dest) as tmp:
            base = tmp.resolve()
            for info, parts in plan:
                target = base.joinpath(*parts)
                # The names were checked above; this also catches anything the check missed
                # (odd Unicode, a folder that turned into a link) before writing.
                if not target.resolve().is_relative_to(base):
                    raise ArchiveError(
                        f"{shown}: member {info.filename!r} resolves outside the "
                        "destination folder; refusing to extract"
                    )
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                what = f"{shown}: member {info.filename!r}"
                try:
                    with zf.open(info) as source, open(target, "xb") as out:
                        written = _copy_limited(source, out, info.file_size, what)
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    # zipfile checks each member's CRC-32 when it reaches the end of it.
                    raise ArchiveError(f"{what} is corrupt: {exc}") from exc
                except NotImplementedError as exc:
                    raise ArchiveError(f"{what} cannot be extracted: {exc}") from exc
                written_total += written
                if written_total > limits.max_total_bytes:
                    raise ArchiveError(
                        f"{shown} unpacks to more than {limits.max_total_bytes} bytes; "
                        "refusing to extract"
                    )
    logger.info("extracted %d entries (%d bytes) from %s", len(plan), written_total, archive)
    return dest


# A folder on disk, or one inside a zip archive (zipfile.Path): the layout is found with the
# same rules in both, before an archive is extracted and after.
Folder = Path | zipfile.Path


def split_folders(root: Folder) -> dict[str, Folder]:
    """The split folders directly under `root`, keyed by canonical split name.

    `train/`, `validation/` (or `val/`) and `test/` are recognised, case-insensitively.

    Args:
        root: Folder to look in.

    Returns:
        A mapping from "train", "validation" and "test" to the folders found (possibly empty).

    Raises:
        DataError: Two folders map to the same split (for example `val/` and `validation/`).
    """
    found: dict[str, Folder] = {}
    for child in _children(root):
        split = _SPLIT_ALIASES.get(child.name.lower())
        if split is None or not child.is_dir():
            continue
        if split in found:
            raise DataError(
                f"{root} has both {found[split].name}/ and {child.name}/; keep one folder "
                f"for the {split} split"
            )
        found[split] = child
    return found


def _children(folder: Folder) -> list[Folder]:
    return sorted(folder.iterdir(), key=lambda child: child.name)


def _subdirs(folder: Folder) -> list[Folder]:
    return [
        child for child in _children(folder) if child.is_dir() and not _is_litter_dir(child.name)
    ]


def _is_image(file: Folder) -> bool:
    return file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES and not is_litter(file.name)


def _has_direct_images(folder: Folder) -> bool:
    return any(_is_image(child) for child in folder.iterdir())


def _has_images(folder: Folder) -> bool:
    if _has_direct_images(folder):  # first: listing sub-folders looks at every file
        return True
    # Linked folders are not followed (a link to a parent would never end).
    below = [sub for sub in _subdirs(folder) if not getattr(sub, "is_symlink", bool)()]
    return any(_has_images(sub) for sub in below)


def _check_classes_have_images(folders: list[Folder]) -> None:
    empty = [folder for folder in folders if not _has_images(folder)]
    if empty:
        names = ", ".join(str(folder) for folder in empty)
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"class folder(s) without any image files ({suffixes}): {names}")


def _classify(folder: Folder) -> tuple[str, tuple[str, ...]] | None:
    """(layout, classes) if `folder` is a dataset root, None if it does not look like one."""
    splits = split_folders(folder)
    if "train" in splits and "validation" in splits:
        layout = "train_validation_test" if "test" in splits else "train_validation"
        train_classes = tuple(child.name for child in _subdirs(splits["train"]))
        if not train_classes:
            raise DataError(
                f"{splits['train']} has no class folders: expected one folder per class "
                "(for example train/cats/ and train/dogs/)"
            )
        for split_dir in splits.values():
            classes = tuple(child.name for child in _subdirs(split_dir))
            if classes != train_classes:
                missing = sorted(set(train_classes) - set(classes))
                extra = sorted(set(classes) - set(train_classes))
                raise DataError(
                    f"{split_dir} does not have the same class folders as {splits['train']}: "
                    f"missing {missing}, extra {extra}"
                )
        if len(train_classes) < 2:
            raise DataError(
                f"{splits['train']} has only one class folder ({train_classes[0]}/); a "
                "classifier needs at least two"
            )
        _check_classes_have_images(
            [split_dir / name for split_dir in splits.values() for name in train_classes]
        )
        return layout, train_classes
    if splits.keys() & {"train", "validation"}:
        # Half a split layout is almost certainly a mistake, not a flat root whose classes
        # happen to be called "train" or "test".
        present = ", ".join(f"{path.name}/" for path in splits.values())
        raise DataError(
            f"{folder} has {present} but needs both train/ and validation/ (or val/), each "
            "with one folder per class"
        )
    subdirs = _subdirs(folder)
    if sum(_has_direct_images(child) for child in subdirs) >= 2:
        _check_classes_have_images(subdirs)
        return "single_root", tuple(child.name for child in subdirs)
    return None


def find_dataset_root(folder: Folder) -> tuple[Folder, str, tuple[str, ...]]:
    """Find the image-folder dataset in `folder` or one level below it.

    Recognised layouts: "train_validation_test" (train/, validation/ and test/),
    "train_validation" (train/ and validation/ or val/), each holding one folder per class,
    and "single_root" (at least two class folders holding images directly). Stray files beside
    the folders (such as the official archive's vectorize.py) and OS litter are ignored.

    Args:
        folder: An extracted archive or a user's image folder, or the root of an archive not
            extracted yet (`zipfile.Path`).

    Returns:
        (root, layout, classes): the dataset root, its layout and the sorted class names.

    Raises:
        DataError: No layout matches, split folders disagree on their classes, a class
            folder holds no images, there are fewer than two classes, or several
            sub-folders each hold a dataset.
    """
    folder = folder if isinstance(folder, zipfile.Path) else Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist or is not a folder")
    found = _classify(folder)
    if found is not None:
        return folder, *found
    # Archives usually wrap everything in one top-level folder (cats_and_dogs_filtered/).
    candidates = []
    for child in _subdirs(folder):
        child_found = _classify(child)
        if child_found is not None:
            candidates.append((child, *child_found))
    if len(candidates) > 1:
        names = ", ".join(f"{candidate[0].name}/" for candidate in candidates)
        raise DataError(f"{folder} holds several datasets ({names}); point to one of them")
    if candidates:
        return candidates[0]
    raise DataError(
        f"{folder} has no class folders: expected train/ and validation/ each with one "
        "folder per class, or one folder per class (searched the folder and one level down)"
    )
