"""Per-image results kept by the image's content, so that a run computes only what is new.

A `PieceStore` holds one kind of per-image result made one way: its folder is named by a hash
of everything that made it (the settings and the code), and each piece by the content hash of
its image. Whatever path or split an image moves to, its pieces are found again; an image that
was removed costs nothing.

Pieces are written in packs, each sealed on its own: the rows go to a temporary file, which is
renamed into place, and then the pack's index (its keys, in row order, and the rows' SHA-256)
is written atomically. A pack without its index does not exist for a reader, and a pack whose
rows no longer match their hash is dropped, so a run killed while writing leaves nothing that
a later run trusts: the next run computes exactly the pieces that were not sealed.

    <root>/<kind>/<version>/<pack>.npy     rows (array pieces)
    <root>/<kind>/<version>/<pack>.json    {"keys": [...], "sha256": "..."}, or
                                           {"keys": [...], "values": [...]} (JSON pieces)
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catdog.arrays import NpyRows, NpyWriter
from catdog.hashing import HashMemo, code_fingerprint, sha256_json
from catdog.io import atomic_write_json

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".json"
ROWS_SUFFIX = ".npy"
WORKING_PREFIX = ".tmp-"  # rows being written: not a pack until renamed and indexed
NOTE_PREFIX = "note-"  # not a pack: what a run found about the images as a whole


@dataclass(frozen=True)
class Reuse:
    """How many images a per-image stage computed, and how many it found already done."""

    computed: int = 0
    reused: int = 0

    def __add__(self, other: Reuse) -> Reuse:
        return Reuse(self.computed + other.computed, self.reused + other.reused)

    def to_json(self) -> dict[str, int]:
        return {"computed": self.computed, "reused": self.reused}


def version_of(made_by: Any) -> str:
    """The folder name of the pieces that `made_by` (JSON: settings, code hashes) makes."""
    return sha256_json(made_by)[:20]


class PieceStore:
    """The packs of one kind of piece, made one way."""

    def __init__(self, folder: Path, memo: HashMemo | None = None) -> None:
        self.folder = Path(folder)
        self.memo = memo or HashMemo()

    @classmethod
    def at(cls, root: Path, kind: str, made_by: Any, memo: HashMemo | None = None) -> PieceStore:
        return cls(Path(root) / kind / version_of({"kind": kind, "made_by": made_by}), memo)

    def _indexes(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Every sealed pack's index, in name order (packs are named at random, so two that
        hold one key decide which is read by chance; both hold the same piece)."""
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob(f"*{INDEX_SUFFIX}")):
            if path.name.startswith(NOTE_PREFIX):
                continue
            try:
                index = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                log.warning("%s: unreadable pack index, ignored (its pieces are recomputed)", path)
                continue
            if isinstance(index, dict) and isinstance(index.get("keys"), list):
                yield path, index

    def _new_pack(self) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        return uuid.uuid4().hex

    # Array pieces ------------------------------------------------------------------------

    def locate(self) -> dict[str, tuple[Path, int]]:
        """Where each sealed array piece is: its pack's rows file and row."""
        found: dict[str, tuple[Path, int]] = {}
        for index_path, index in self._indexes():
            rows = index_path.with_suffix(ROWS_SUFFIX)
            try:
                intact = self.memo.sha256(rows) == index.get("sha256")
            except FileNotFoundError:
                intact = False
            if not intact:  # a damaged pack is dropped; another error (EIO...) is raised
                log.warning("%s: rows missing or changed; its pieces are recomputed", rows)
                _drop_pack(index_path)
                continue
            for row, key in enumerate(index["keys"]):
                found.setdefault(str(key), (rows, row))
        self.memo.save()
        return found

    @contextmanager
    def adding_rows(
        self,
        row_shape: tuple[int, ...],
        dtype: np.dtype | type,
        total: int,
        purpose: str,
        pack_rows: int = 1024,
    ) -> Iterator[RowPacker]:
        """A packer for `total` new rows, sealed a pack of `pack_rows` at a time."""
        packer = RowPacker(self, tuple(row_shape), np.dtype(dtype), total, purpose, pack_rows)
        try:
            yield packer
            packer.finish()
        finally:
            packer.discard()

    def gather(
        self,
        keys: Sequence[str],
        out: NpyWriter,
        located: dict[str, tuple[Path, int]],
        batch: int = 256,
    ) -> None:
        """Write the pieces of `keys`, in that order, to `out`, `batch` rows at a time."""
        rows = PieceRows(keys, located, out.row_shape, out.dtype)
        try:
            for start in range(0, len(keys), batch):
                out.write(rows[start : start + batch])
        finally:
            rows.close()

    def pack_files(
        self, keys: Iterable[str], located: dict[str, tuple[Path, int]]
    ) -> dict[Path, str]:
        """The packs that hold `keys`, with their rows' SHA-256 (as their indexes say)."""
        wanted = {located[key][0] for key in keys}
        found: dict[Path, str] = {}
        for index_path, index in self._indexes():
            rows = index_path.with_suffix(ROWS_SUFFIX)
            if rows in wanted:
                found[rows] = str(index.get("sha256"))
        return found

    # JSON pieces -------------------------------------------------------------------------

    def values(self) -> dict[str, Any]:
        """Every sealed JSON piece, by key."""
        found: dict[str, Any] = {}
        for _path, index in self._indexes():
            values = index.get("values")
            if isinstance(values, list) and len(values) == len(index["keys"]):
                for key, value in zip(index["keys"], values, strict=True):
                    found.setdefault(str(key), value)
        return found

    def add_values(self, pieces: Iterable[tuple[str, Any]]) -> None:
        """Seal `pieces` (key, JSON value) as one pack."""
        keys, values = [], []
        for key, value in pieces:
            keys.append(key)
            values.append(value)
        if keys:
            pack = self._new_pack()
            atomic_write_json(
                self.folder / f"{pack}{INDEX_SUFFIX}",
                {"keys": keys, "values": values},
                compact=True,
            )

    # Notes: what a whole run found about the store's images, beside its pieces -------------

    def notes(self, kind: str) -> Iterator[dict[str, Any]]:
        """The notes of `kind` (see `add_note`), newest first; unreadable ones are skipped."""
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob(f"{NOTE_PREFIX}{kind}-*.json"), reverse=True):
            with suppress(OSError, ValueError):
                yield json.loads(path.read_text(encoding="utf-8"))

    def add_note(self, kind: str, value: dict[str, Any], keep: int = 3) -> None:
        """Seal a note of `kind` (JSON), and remove all but the newest `keep` of that kind."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{NOTE_PREFIX}{kind}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        atomic_write_json(self.folder / name, value)
        for old in sorted(self.folder.glob(f"{NOTE_PREFIX}{kind}-*.json"), reverse=True)[keep:]:
            old.unlink(missing_ok=True)


def _drop_pack(index_path: Path) -> None:
    """Remove a damaged pack, its index first (so that it stops existing before its rows)."""
    with suppress(OSError):
        index_path.unlink()
    with suppress(OSError):
        index_path.with_suffix(ROWS_SUFFIX).unlink()


class RowPacker:
    """Takes rows with their keys and seals them into packs of the store."""

    def __init__(
        self,
        store: PieceStore,
        row_shape: tuple[int, ...],
        dtype: np.dtype,
        total: int,
        purpose: str,
        pack_rows: int,
    ) -> None:
        self.store = store
        self.row_shape = row_shape
        self.dtype = dtype
        self.remaining = total
        self.purpose = purpose
        self.pack_rows = max(1, pack_rows)
        self._writer: NpyWriter | None = None
        self._keys: list[str] = []
        self._pack = ""

    def add(self, keys: Sequence[str], rows: np.ndarray) -> None:
        if len(keys) != len(rows):
            raise ValueError(f"{len(keys)} keys for {len(rows)} rows")
        done = 0
        while done < len(keys):
            if self._writer is None:
                self._open()
            assert self._writer is not None
            room = self._writer.shape[0] - len(self._keys)
            take = min(room, len(keys) - done)
            self._writer.write(rows[done : done + take])
            self._keys.extend(keys[done : done + take])
            done += take
            if len(self._keys) == self._writer.shape[0]:
                self._seal()

    def _open(self) -> None:
        if self.remaining <= 0:
            raise ValueError(f"{self.purpose}: more rows than were announced")
        size = min(self.pack_rows, self.remaining)
        self._pack = self.store._new_pack()
        working = self.store.folder / f"{WORKING_PREFIX}{self._pack}{ROWS_SUFFIX}"
        self._writer = NpyWriter(working, (size, *self.row_shape), self.dtype, self.purpose)
        self._keys = []

    def _seal(self) -> None:
        assert self._writer is not None
        self._writer.close()
        rows = self.store.folder / f"{self._pack}{ROWS_SUFFIX}"
        os.replace(self._writer.path, rows)
        digest = self._writer.sha256
        self.store.memo.note(rows, digest, os.stat(rows))
        atomic_write_json(
            self.store.folder / f"{self._pack}{INDEX_SUFFIX}",
            {"keys": self._keys, "sha256": digest},
            compact=True,
        )
        self.store.memo.save()
        self.remaining -= len(self._keys)
        self._writer, self._keys = None, []

    def finish(self) -> None:
        if self._writer is not None or self.remaining:
            raise ValueError(f"{self.purpose}: {self.remaining} announced rows never came")

    def discard(self) -> None:
        """Remove the unsealed pack a failure left (sealed packs stay: they are whole)."""
        if self._writer is not None:
            self._writer.abandon()
            self._writer = None


# The stores of each kind of piece: what makes a piece (settings, the code that computes it and
# the decoder's version) names its folder, so a change of any of them starts a new one.


def _decoder() -> str:
    import PIL

    return f"Pillow {PIL.__version__}"


def validation_pieces(root: Path, memo: HashMemo | None = None) -> PieceStore:
    """Each image's verdict (None: usable; else why not), by its bytes' SHA-256."""
    made_by = {"code": code_fingerprint("catdog.data.manifest"), "decoder": _decoder()}
    return PieceStore.at(root, "validation", made_by, memo)


def inspection_pieces(root: Path, memo: HashMemo | None = None) -> PieceStore:
    """Each image's properties, colour mode and perceptual hashes (catdog.data.quality)."""
    made_by = {"code": code_fingerprint("catdog.data.quality"), "decoder": _decoder()}
    return PieceStore.at(root, "inspection", made_by, memo)


def pixel_pieces(root: Path, size: int, memo: HashMemo | None = None) -> PieceStore:
    """Each image decoded to `size` x `size` RGB, uint8."""
    made_by = {"code": code_fingerprint("catdog.data.images"), "decoder": _decoder(), "size": size}
    return PieceStore.at(root, "pixels", made_by, memo)


def feature_pieces(root: Path, made_by: Any, memo: HashMemo | None = None) -> PieceStore:
    """One view's frozen-base features of each image; `made_by` names the base, its weights,
    the input size, the view (and the seed of an augmented one) and the code."""
    return PieceStore.at(root, "features", made_by, memo)


class PieceRows:
    """The array pieces of `keys`, in that order, read from the packs that hold them a row at
    a time (the `catdog.arrays.Rows` protocol): a split's images without a copy of them."""

    def __init__(
        self,
        keys: Sequence[str],
        located: dict[str, tuple[Path, int]],
        row_shape: tuple[int, ...],
        dtype: np.dtype | type,
    ) -> None:
        missing = [key for key in keys if key not in located]
        if missing:
            raise KeyError(f"{len(missing)} pieces are not in the store (first: {missing[0]})")
        packs = sorted({located[key][0] for key in keys})
        self._readers = [NpyRows(path) for path in packs]
        number = {path: i for i, path in enumerate(packs)}
        self._pack = np.array([number[located[key][0]] for key in keys], dtype=np.int64)
        self._row = np.array([located[key][1] for key in keys], dtype=np.int64)
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        for reader in self._readers:
            if reader.row_shape != self.row_shape or reader.dtype != self.dtype:
                raise ValueError(f"{reader.path} holds rows of {reader.row_shape} {reader.dtype}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._row), *self.row_shape)

    def __len__(self) -> int:
        return len(self._row)

    def __getitem__(self, index: int | slice | np.ndarray | Sequence[int]) -> np.ndarray:
        if isinstance(index, slice):
            wanted = np.arange(*index.indices(len(self)))
        elif np.ndim(index) == 0:
            return self[[int(index)]][0]  # type: ignore[index]
        else:
            wanted = np.asarray(index, dtype=np.int64)
            wanted = np.where(wanted < 0, wanted + len(self), wanted)
            if wanted.size and (wanted.min() < 0 or wanted.max() >= len(self)):
                raise IndexError(f"row index out of range for {len(self)} rows")
        out = np.empty((len(wanted), *self.row_shape), self.dtype)
        position = 0
        while position < len(wanted):
            # Rows that follow one another in one pack are one read.
            pack, first = self._pack[wanted[position]], self._row[wanted[position]]
            run = 1
            while (
                position + run < len(wanted)
                and self._pack[wanted[position + run]] == pack
                and self._row[wanted[position + run]] == first + run
            ):
                run += 1
            self._readers[pack].read_into(out[position : position + run], int(first))
            position += run
        return out

    def load(self) -> np.ndarray:
        return self[:]

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
