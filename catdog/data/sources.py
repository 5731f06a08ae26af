"""Where the dataset comes from: a URL, a local zip, or a folder that already holds images."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from catdog.data.extract import find_dataset_root
from catdog.data.store_source import is_store_folder, listing_fingerprint, locate_dataset
from catdog.errors import DataError
from catdog.hashing import HashMemo, folder_fingerprint, sha256_file
from catdog.store import is_object_url


@dataclass(frozen=True)
class Source:
    kind: str  # "url", "zip", "folder" or "store" (a folder in an object store)
    location: str  # the URL, or an absolute path

    @property
    def path(self) -> Path:
        return Path(self.location)


def is_url(value: str) -> bool:
    """Whether `--data` names an archive to download (an http or https URL with a host, or an
    object in a store: `s3://bucket/key.zip`), rather than a local file, a file:// URL or a
    folder."""
    try:
        parsed = urlparse(value)
    except ValueError:  # "http://[::1": not a URL anything can fetch
        return False
    return (parsed.scheme.lower() in ("http", "https") and bool(parsed.netloc)) or (
        is_object_url(value)
    )


def parse_source(value: str) -> Source:
    """Classify `--data`: an http(s) URL or an archive in a store, a folder of class folders in
    a store (`s3://bucket/photos/`), a file:// URL or path to a .zip, or a folder."""
    if is_store_folder(value):
        return Source("store", value.rstrip("/"))
    if is_url(value):
        return Source("url", value)
    parsed = urlparse(value)
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
    if source.kind == "store":  # one listing: no object is fetched
        located, listing = locate_dataset(source.location)
        return f"{located}:{listing_fingerprint(listing)}"
    return f"{source.location}:{folder_fingerprint(source.path)}"


def check_zip(path: Path, label: str | None = None) -> None:
    """Fail fast, before any work, on a file that is not a zip or holds no usable dataset
    layout, by the same rules as the extracted archive is read by (`find_dataset_root`)."""
    label = label or str(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            head = handle.read(16)
        raise DataError(f"--data {label}: not a zip archive (it starts with {head!r})")
    try:
        with zipfile.ZipFile(path) as archive:
            find_dataset_root(zipfile.Path(archive))
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"--data {label}: unreadable zip archive ({error})") from error
    except DataError as error:
        # Inside the archive, paths are named from its root: "tiny_filtered/train/".
        inside = str(error).replace(f"{path}/ ", "the archive ").replace(f"{path}/", "")
        raise DataError(f"--data {label}: {inside}") from None
