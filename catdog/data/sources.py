"""Where the dataset comes from: a URL, a local zip, or a folder that already holds images."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from catdog.data.extract import IMAGE_SUFFIXES
from catdog.errors import DataError
from catdog.hashing import HashMemo, folder_fingerprint, sha256_file

SPLIT_DIRS = ("train", "validation", "val", "test")
LITTER_DIRS = frozenset({"__MACOSX"})


@dataclass(frozen=True)
class Source:
    kind: str  # "url", "zip" or "folder"
    location: str  # the URL, or an absolute path

    @property
    def path(self) -> Path:
        return Path(self.location)


def parse_source(value: str) -> Source:
    """Classify `--data`: an http(s) URL, a file:// URL or path to a .zip, or a folder."""
    parsed = urlparse(value)
    if parsed.scheme in ("http", "https"):
        return Source("url", value)
    path = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(value).expanduser()
    if not path.exists():
        raise DataError(f"--data {value}: no such file or folder")
    path = path.resolve()
    if path.is_dir():
        return Source("folder", str(path))
    return Source("zip", str(path))


def fingerprint(source: Source, memo: HashMemo | None = None) -> str:
    """What identifies the data: the URL, the zip's hash, or the folder and its listing.

    A folder is used in place, so its location is part of its identity.
    """
    if source.kind == "url":
        return source.location
    if source.kind == "zip":
        return sha256_file(source.path, memo)
    return f"{source.location}:{folder_fingerprint(source.path)}"


def check_zip(path: Path, label: str | None = None) -> None:
    """Fail fast, before any work, on a file that is not a zip or has no class folders."""
    label = label or str(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            head = handle.read(16)
        raise DataError(f"--data {label}: not a zip archive (it starts with {head!r})")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"--data {label}: unreadable zip archive ({error})") from error
    image_dirs = {
        PurePosixPath(name).parent
        for name in names
        if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES
        and not set(PurePosixPath(name).parts) & LITTER_DIRS
    }
    classes = _most_classes(image_dirs)
    if len(classes) == 1:
        raise DataError(
            f"--data {label}: only one class folder ({next(iter(classes))}/); a classifier "
            "needs at least two"
        )
    if not classes:
        raise DataError(
            f"--data {label}: no class folders found; expected train/ and validation/ "
            "each with one folder per class, or one folder per class (at the top or one "
            "level down)"
        )


def _most_classes(image_dirs: set[PurePosixPath]) -> set[str]:
    """The class folders of the layout with the most of them, at depth 0 or 1: split folders
    (train/ and validation/ or test/) of classes, or class folders of images; empty if none."""
    candidates = {PurePosixPath(".")} | {
        PurePosixPath(d.parts[0]) for d in image_dirs if len(d.parts) > 1
    }

    def classes_under(folder: PurePosixPath) -> set[str]:
        return {d.name for d in image_dirs if d.parent == folder}

    found: set[str] = set()
    for root in candidates:
        prefix = PurePosixPath() if root == PurePosixPath(".") else root
        train, validation, val, test = (classes_under(prefix / name) for name in SPLIT_DIRS)
        layouts = [classes_under(prefix)]
        if train and (validation or val or test):
            layouts.append(train)
        found = max([found, *layouts], key=len)
    return found
