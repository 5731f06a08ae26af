"""The manifest: every usable image once, with its class, content hash and split."""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from catdog.hashing import canonical_json, sha256_bytes
from catdog.io import atomic_write_bytes, read_json

SPLITS = ("train", "validation", "test")
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class ImageEntry:
    path: str  # relative to the manifest's root, POSIX separators
    label: int  # index into Manifest.classes (classes are sorted folder names)
    class_name: str
    sha256: str  # of the file's bytes
    source_split: str | None  # train/validation/test folder it came from; None if flat
    split: str | None = None  # assigned by the split stage


@dataclass(frozen=True)
class SkippedFile:
    path: str  # relative to the manifest's root
    reason: str  # why it cannot be used, e.g. "truncated image", "duplicate of train/cats/a.jpg"


@dataclass(frozen=True)
class Manifest:
    root: str  # absolute path of the folder that holds the images
    layout: str  # "train_validation", "train_validation_test" or "single_root"
    classes: tuple[str, ...]
    images: tuple[ImageEntry, ...]
    skipped: tuple[SkippedFile, ...] = ()
    split_settings: dict[str, Any] = field(default_factory=dict)  # seed and fractions, once split

    def in_split(self, split: str) -> list[ImageEntry]:
        return [image for image in self.images if image.split == split]

    def paths(self, entries: Iterable[ImageEntry]) -> list[Path]:
        root = Path(self.root)
        return [root / entry.path for entry in entries]

    def with_images(self, images: Iterable[ImageEntry], **changes: Any) -> Manifest:
        return replace(self, images=tuple(images), **changes)

    def to_json(self) -> dict[str, Any]:  # the manifest file's JSON
        # Entry by entry, not `asdict`, whose deep copies took most of the time of a manifest
        # of 30,000 images (about 0.15 s of every stage that writes or hashes one).
        return {
            "root": self.root,
            "layout": self.layout,
            "classes": list(self.classes),
            "images": [dict(vars(entry)) for entry in self.images],
            "skipped": [dict(vars(entry)) for entry in self.skipped],
            "split_settings": copy.deepcopy(self.split_settings),
            "format": MANIFEST_FORMAT,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            root=data["root"],
            layout=data["layout"],
            classes=tuple(data["classes"]),
            images=tuple(ImageEntry(**entry) for entry in data["images"]),
            skipped=tuple(SkippedFile(**entry) for entry in data.get("skipped", ())),
            split_settings=dict(data.get("split_settings", {})),
        )

    def _content(self) -> bytes:
        data = self.to_json()
        del data["root"]
        return canonical_json(data)

    def content_hash(self) -> str:
        """Identity of the manifest's content, independent of where the images are stored."""
        return sha256_bytes(self._content())

    def save(self, path: Path) -> str:
        """Write the manifest's file (compact JSON); returns its `content_hash`.

        The file is the content's canonical JSON with the root added as its first member:
        a manifest of 30,000 images is serialised once for both, not twice (0.07 s each).
        """
        content = self._content()
        root = json.dumps(self.root).encode("utf-8")
        atomic_write_bytes(Path(path), b'{"root":' + root + b"," + content[1:] + b"\n")
        return sha256_bytes(content)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        return cls.from_json(read_json(path))


def load_manifest(path: Path) -> Manifest:
    """`Manifest.load`, shared by the stages of one process.

    The stages of a run read the same split manifest one after another: at 30,000 images each
    read costs 0.2 s. The copy kept is the file's as it is now (its inode, size and times): a
    file written anew is read anew.
    """
    stat = os.stat(path)
    return _load_as_of(
        os.fspath(path), (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    )


@functools.lru_cache(maxsize=2)  # a manifest and its split: 14 MiB each at 30,000 images
def _load_as_of(path: str, _stamp: tuple[int, int, int, int]) -> Manifest:
    return Manifest.load(Path(path))
