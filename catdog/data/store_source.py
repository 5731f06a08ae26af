"""A dataset kept in an object store as a folder of class folders (`--data s3://bucket/photos/`).

Every host that reads its images keeps a mirror of it (under `CATDOG_CACHE_DIR`), so that the
manifest, the decoders and the figures read local files as they do for a folder source:

* `list_images` lists the prefix: each image object's ETag and size, without fetching a body
  (what the download stage is keyed by, so an unchanged prefix costs one listing);
* `SourceMirror.sync` makes the mirror hold exactly a listing, fetching only the objects whose
  ETag it has not fetched before;
* `SourceMirror.ensure` makes images a manifest names present on this host, each checked
  against the content hash the manifest gave it (a worker that did not build the manifest).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from catdog.data.extract import IMAGE_SUFFIXES, find_dataset_root, is_litter
from catdog.errors import DataError, ImageChangedError
from catdog.hashing import HashMemo, sha256_file_uncached, sha256_json
from catdog.io import atomic_write_json, read_json
from catdog.store import ObjectStore, StoreError, cache_root, is_object_url, safe_relative

LISTING_FILE = "listing.json"  # a download's listing of the images in the store
MIRROR_INDEX = ".catdog-mirror.json"  # relative key -> [ETag, size] of each object fetched
_LOCK = ".catdog-mirror.lock"
FETCH_BATCH = 256  # objects fetched per request batch: a run stopped midway keeps those

# A listing: each image object's name under the prefix -> [ETag, size].
Listing = dict[str, list[Any]]


def is_store_folder(value: str) -> bool:
    """Whether `--data` names a folder of class folders in an object store (a prefix), as
    against one archive there (`s3://bucket/photos.zip`)."""
    return is_object_url(value) and not urlsplit(value).path.lower().endswith(".zip")


def data_store(url: str) -> ObjectStore:
    """The store of a `--data` prefix, whose failures name `--data`."""
    return ObjectStore(url.rstrip("/"), flag="--data")


def list_images(url: str) -> Listing:
    """Every image object under the prefix `url` (hidden, litter and non-image objects left
    out), by name relative to it, with its ETag and size.

    Raises:
        DataError: The prefix holds no image.
        StoreError: The store cannot be read (its words name `--data`).
    """
    store = data_store(url)
    try:
        objects = store.details()
    except StoreError:
        raise
    except Exception as error:  # refused credentials, no such bucket: in words that say so
        raise store.explain(error) from None
    if not objects:
        store.check(write=False)  # a bucket that does not exist says so
    found: Listing = {}
    for name, info in objects.items():
        parts = name.split("/")
        try:
            safe_relative(name)
        except StoreError:
            raise DataError(
                f"--data {url}: the object {name!r} is not a path inside the prefix (an "
                "absolute name, or one with '..'); rename it or use another prefix"
            ) from None
        if any(part.startswith(".") or is_litter(part) for part in parts):
            continue
        if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
            continue
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        found[name] = [etag, int(info.get("size") or info.get("Size") or 0)]
    if not found:
        raise DataError(f"--data {url}: no images under this prefix (a folder of class folders)")
    return dict(sorted(found.items()))


def locate_dataset(url: str) -> tuple[str, Listing]:
    """The dataset under the prefix `url`: the URL of its root (the prefix, or the one folder
    below it that holds the dataset, as in an archive) and the listing of its images relative
    to that root. The layout is found from the names alone, as `find_dataset_root` finds it in
    a folder (no object is fetched).

    Raises:
        DataError: No images, or no dataset layout (see `find_dataset_root`).
    """
    listing = list_images(url)
    names = io.BytesIO()
    with zipfile.ZipFile(names, "w") as index:
        for name in listing:
            index.writestr(name, b"")
    archive = zipfile.ZipFile(names)
    archive.filename = url.rstrip("/")  # what find_dataset_root's messages name
    try:
        root, _layout, _classes = find_dataset_root(zipfile.Path(archive))
    except DataError as error:
        raise DataError(f"--data {error}") from None
    inner = root.at.rstrip("/")
    if not inner:
        return url.rstrip("/"), listing
    start = len(inner) + 1
    return f"{url.rstrip('/')}/{inner}", {
        name[start:]: value for name, value in listing.items() if name.startswith(f"{inner}/")
    }


def listing_fingerprint(listing: Listing) -> str:
    """What identifies the data in the store: every image's name, ETag and size."""
    return sha256_json(listing)


class SourceMirror:
    """This host's copy of the images under a store prefix."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.store = data_store(url)
        parts = urlsplit(self.url)
        prefix = quote(parts.path.strip("/") or "/", safe="")
        self.folder = cache_root() / "sources" / parts.scheme / parts.netloc / prefix

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One process at a time changes this host's mirror (two runs, or two workers)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / _LOCK, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _index(self) -> Listing:
        try:
            index = read_json(self.folder / MIRROR_INDEX)
        except (OSError, ValueError):
            return {}
        return index if isinstance(index, dict) else {}

    def _fetch(self, names: Sequence[str], index: Listing, listing: Listing | None) -> None:
        """Fetch objects into the mirror, a batch at a time, each batch noted in the index."""
        for start in range(0, len(names), FETCH_BATCH):
            batch = names[start : start + FETCH_BATCH]
            try:
                self.store.get_many({name: self.folder / name for name in batch})
            except FileNotFoundError as error:
                raise DataError(
                    f"--data {self.url}: {error} is gone from the store since it was listed; "
                    "run again once the prefix has stopped changing"
                ) from None
            for name in batch:
                index[name] = (listing or {}).get(name, ["", (self.folder / name).stat().st_size])
            atomic_write_json(self.folder / MIRROR_INDEX, index, compact=True)

    def sync(self, listing: Listing) -> int:
        """Make the mirror hold exactly the objects of `listing`: fetch those whose ETag it
        has not fetched (new or changed), remove those no longer listed. Returns how many
        were fetched."""
        with self._locked():
            index = self._index()
            stale = [name for name in index if name not in listing]
            for name in stale:
                with contextlib.suppress(FileNotFoundError):
                    (self.folder / name).unlink()
                del index[name]
            wanted = [
                name
                for name, (etag, size) in listing.items()
                if index.get(name) != [etag, size] or not (self.folder / name).is_file()
            ]
            self._fetch(wanted, index, listing)
            if stale and not wanted:
                atomic_write_json(self.folder / MIRROR_INDEX, index, compact=True)
            for folder in sorted({(self.folder / name).parent for name in stale}, reverse=True):
                with contextlib.suppress(OSError):  # emptied class folders go too
                    os.removedirs(folder)
        return len(wanted)

    def ensure(self, images: Sequence[tuple[str, str]], memo: HashMemo) -> int:
        """Make each image (relative path, SHA-256 the manifest gave it) present with those
        bytes, fetching from the store what is missing or different. Returns how many were
        fetched.

        Raises:
            ImageChangedError: An object's bytes in the store are no longer the manifest's.
        """
        paths = [str(self.folder / path) for path, _ in images]
        known = memo.known_all(paths)
        wanted = [
            (path, sha256)
            for (path, sha256), local, digest in zip(images, paths, known, strict=True)
            if (digest if digest is not None else _hashed(Path(local), memo)) != sha256
        ]
        if wanted:
            with self._locked():
                index = self._index()
                for path, _ in wanted:
                    index.pop(path, None)
                self._fetch([path for path, _ in wanted], index, None)
            for path, sha256 in wanted:
                if _hashed(self.folder / path, memo) != sha256:
                    raise ImageChangedError(
                        f"{self.url}/{path} changed in the store after this run's manifest "
                        "read it; run again once the prefix has stopped changing"
                    )
        memo.save()
        return len(wanted)


def _hashed(path: Path, memo: HashMemo) -> str | None:
    """The SHA-256 of a mirrored file, noted in `memo` as the manifest notes the files it
    reads (so a later look needs only a stat); None if there is no such file."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    digest = sha256_file_uncached(path)
    memo.note(path, digest, stat)
    return digest
