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
    if not _has_class_folders(image_dirs):
        raise DataError(
            f"--data {label}: no class folders found; expected train/ and validation/ "
            "each with one folder per class, or one folder per class (at the top or one "
            "level down)"
        )


def _has_class_folders(image_dirs: set[PurePosixPath]) -> bool:
    """Whether some root at depth 0 or 1 has split folders of classes, or >= 2 class folders."""
    candidates = {PurePosixPath(".")} | {
        PurePosixPath(d.parts[0]) for d in image_dirs if len(d.parts) > 1
    }
    for root in candidates:

        def classes_under(folder: PurePosixPath) -> set[str]:
            return {d.name for d in image_dirs if d.parent == folder}

        prefix = PurePosixPath() if root == PurePosixPath(".") else root
        splits = [classes_under(prefix / name) for name in SPLIT_DIRS]
        if len(splits[0]) >= 2 and (len(splits[1]) >= 2 or len(splits[2]) >= 2):
            return True
        if len(classes_under(prefix)) >= 2:
            return True
    return False
