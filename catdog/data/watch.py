"""What changed in a data source since it was last looked at, without reading an image.

`catdog watch` asks this every few minutes, so a look must stay cheap on a large dataset: a
folder is listed (each image's path, size and modification time), a zip's central directory is
read (each member's size and CRC), a URL is asked with a HEAD (ETag, Last-Modified, length).
Nothing here imports TensorFlow, NumPy or Prefect.

A change is announced once it has settled: a folder being copied into changes at every look,
and a run started halfway through the copy would train on half of it. `Watch.look` announces
a revision only after it was seen unchanged for `settle` seconds, so a burst of changes is one
announcement, made when the burst is over.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from catdog.data.extract import IMAGE_SUFFIXES, is_litter
from catdog.data.freshness import SourceUnavailable, is_unvalidated, probe
from catdog.data.sources import parse_source
from catdog.data.store_source import list_images
from catdog.errors import DataError
from catdog.hashing import sha256_bytes
from catdog.io import atomic_write_json, read_json
from catdog.store import StoreError, StoreFault

EVENT = "catdog.data.changed"
EXAMPLES = 10  # file names an announcement lists of each kind of change


@dataclass(frozen=True)
class Snapshot:
    """One look at a source: its revision, and its files where it has a listing."""

    source: str  # the URL, or the absolute path of the zip or folder
    revision: str
    files: dict[str, str] | None = None  # relative path -> "size:mtime_ns" or "size:crc"


@dataclass(frozen=True)
class Change:
    """A settled change of a source: what `catdog.data.changed` carries."""

    source: str
    old_revision: str
    new_revision: str
    added: int | None = None  # None: a source without a listing (a URL) cannot tell
    removed: int | None = None
    changed: int | None = None
    examples: dict[str, list[str]] = field(default_factory=dict)

    def describe(self) -> str:
        if self.added is None:
            return f"{self.source}: a new revision"
        return (
            f"{self.source}: {self.added} image(s) added, {self.removed} removed, "
            f"{self.changed} changed"
        )


def source_name(data: str) -> str:
    """The name a source is announced and matched by: the URL, or the absolute local path."""
    source = parse_source(data)
    return source.location


def source_resource(name: str) -> dict[str, str]:
    """The Prefect event resource of a source (the event's subject, and a trigger's match)."""
    return {
        "prefect.resource.id": f"catdog.data.{_digest(name)}",
        "prefect.resource.name": name,
        "catdog.source": name,
    }


def snapshot(data: str) -> Snapshot:
    """Look at `data` (a URL, a zip, a folder, or a folder in an object store) once.

    Raises:
        DataError: A local source that is not there or cannot be read, or a URL whose server
            gives no ETag, Last-Modified or Content-Length (nothing to tell a change by).
        SourceUnavailable: A URL whose server did not answer.
    """
    source = parse_source(data)
    if source.kind == "url":
        revision = probe(source.location, attempts=1)
        if is_unvalidated(revision):
            raise DataError(
                f"--data {source.location}: the server gives no ETag, Last-Modified or "
                "Content-Length, so a look cannot tell whether it changed; retrain on a "
                "schedule instead (`catdog serve --cron`)"
            )
        return Snapshot(source.location, revision)
    if source.kind == "store":  # one listing: each image's ETag and size, no object fetched
        try:
            listing = list_images(source.location)
        except StoreFault as error:
            raise SourceUnavailable(str(error)) from error
        except StoreError as error:
            raise DataError(str(error)) from error
        files = {name: f"{etag}:{size}" for name, (etag, size) in listing.items()}
        return Snapshot(source.location, _revision(files), files)
    try:
        files = _zip_listing(source.path) if source.kind == "zip" else _folder_listing(source.path)
    except OSError as error:
        raise DataError(f"--data {source.location}: cannot be read ({error})") from error
    return Snapshot(source.location, _revision(files), files)


def _folder_listing(root: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    start = len(str(root)) + 1  # names relative to the root, cut as strings: a look at 30,000
    pending = [str(root)]  # images is most of its time in this loop
    while pending:
        try:
            entries = os.scandir(pending.pop())
        except FileNotFoundError:  # removed since it was listed: a change the next look sees
            continue
        with entries:
            for entry in entries:
                if is_litter(entry.name):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                        stat = entry.stat()
                        name = entry.path[start:].replace(os.sep, "/")
                        files[name] = f"{stat.st_size}:{stat.st_mtime_ns}"
                except FileNotFoundError:
                    continue
    return files


def _revision(files: dict[str, str]) -> str:
    """The hash of a listing, fed name by name (no JSON of 30,000 entries held at once)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


def _zip_listing(path: Path) -> dict[str, str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return {
                member.filename: f"{member.file_size}:{member.CRC}"
                for member in archive.infolist()
                if not member.is_dir()
                and not any(is_litter(part) for part in member.filename.split("/"))
                and os.path.splitext(member.filename)[1].lower() in IMAGE_SUFFIXES
            }
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"--data {path}: unreadable zip archive ({error})") from error


def compare(old: Snapshot, new: Snapshot) -> Change:
    """What changed from `old` to `new` (two looks at the same source)."""
    if old.files is None or new.files is None:
        return Change(new.source, old.revision, new.revision)
    added = sorted(new.files.keys() - old.files.keys())
    removed = sorted(old.files.keys() - new.files.keys())
    changed = sorted(
        name for name in new.files.keys() & old.files.keys() if new.files[name] != old.files[name]
    )
    return Change(
        new.source,
        old.revision,
        new.revision,
        added=len(added),
        removed=len(removed),
        changed=len(changed),
        examples={
            kind: names[:EXAMPLES]
            for kind, names in (("added", added), ("removed", removed), ("changed", changed))
            if names
        },
    )


class SnapshotFields(TypedDict):
    source: str
    revision: str
    files: dict[str, str] | None


class WatchState(TypedDict):
    """The watch's state file."""

    announced: SnapshotFields | None
    pending: str | None
    pending_since: float


@dataclass
class Watch:
    """The announced revision of one source, and a newer one waiting to settle; kept in a file
    so that a restarted watch neither misses a change made while it was down nor repeats one."""

    state_file: Path
    settle: float = 0.0  # seconds a new revision must stay unchanged before it is announced
    announced: Snapshot | None = None
    pending: str | None = None  # a revision seen since the announced one, not yet settled
    pending_since: float = 0.0

    @classmethod
    def load(cls, state_file: Path, settle: float) -> Watch:
        watch = cls(state_file, settle)
        try:
            state = read_json(state_file) if state_file.is_file() else {}
            if announced := state.get("announced"):
                watch.announced = Snapshot(**announced)
                watch.pending = state.get("pending")
                watch.pending_since = float(state.get("pending_since", 0.0))
        except (OSError, ValueError, TypeError, AttributeError):
            watch.announced, watch.pending = None, None  # unreadable: the next look is the baseline
        return watch

    def look(self, current: Snapshot, now: float) -> Change | None:
        """The change to announce after this look, if any. The first look is the baseline;
        `commit` (after the announcement went out) makes an announced change the new one."""
        if self.announced is None or self.announced.source != current.source:
            self.announced, self.pending = current, None
            self.save()
            return None
        before = (self.pending, self.pending_since)
        if current.revision == self.announced.revision:
            self.pending = None  # changed and changed back: nothing to announce
        else:
            if current.revision != self.pending:
                self.pending, self.pending_since = current.revision, now
            if now - self.pending_since >= self.settle:
                if (self.pending, self.pending_since) != before:
                    self.save()
                return compare(self.announced, current)
        if (self.pending, self.pending_since) != before:
            self.save()  # only then: the listing of a large folder is megabytes
        return None

    def next_look(self, now: float, every: float) -> float:
        """Seconds until the next look: `every`, or sooner when a change settles before then
        (so a change is announced within `settle` plus one `every` of when it was made)."""
        if self.pending is None:
            return every
        return max(0.0, min(every, self.pending_since + self.settle - now))

    def commit(self, current: Snapshot) -> None:
        self.announced, self.pending = current, None
        self.save()

    def save(self) -> None:
        announced = self.announced
        state = WatchState(
            announced=SnapshotFields(
                source=announced.source, revision=announced.revision, files=announced.files
            )
            if announced
            else None,
            pending=self.pending,
            pending_since=self.pending_since,
        )
        atomic_write_json(self.state_file, state)


def state_file_for(artifacts: Path, source: str) -> Path:
    """Where the watch of `source` keeps its state: under the artifacts folder it serves."""
    return Path(artifacts) / "watch" / f"{_digest(source)}.json"


def _digest(source: str) -> str:
    """A short, stable name for a source: its event resource's id and its state file's."""
    return sha256_bytes(source.encode())[:16]


__all__ = [
    "EVENT",
    "Change",
    "Snapshot",
    "SourceUnavailable",
    "Watch",
    "compare",
    "snapshot",
    "source_name",
    "source_resource",
    "state_file_for",
]
