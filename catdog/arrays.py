"""Arrays on disk that no step holds whole in memory: written in chunks, read a batch at a time.

The files are plain `.npy` (numpy's own header, C order), so `np.load(path, mmap_mode="r")`
and any other numpy tool read them as they are. Rows are read with positioned reads
(`os.preadv`) straight into the batch, not through a memory map: the pages of a mapped file
count as the reader's resident memory, so an epoch over a mapped split would grow the process
by the whole split after all, which is what this module exists to avoid.
"""

from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Protocol

import numpy as np

from catdog.errors import DiskSpaceError
from catdog.io import human_bytes

# Errors that mean "the disk (or this process's share of it) is full", not a bug.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Free space kept beyond what a stage needs, for its record, hashes memo and logs.
SPACE_MARGIN_BYTES = 16 * 1024 * 1024


class Rows(Protocol):
    """What readers of image (or feature) arrays need: a length, a shape and row indexing."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray: ...


class RowsAt:
    """The rows of `rows` at `indexes`, in that order: a `Rows` itself."""

    def __init__(self, rows: Rows, indexes: Sequence[int]) -> None:
        self.rows = rows
        self.indexes = np.asarray(indexes, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.indexes), *self.rows.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.rows.dtype

    def __len__(self) -> int:
        return len(self.indexes)

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray:
        return self.rows[self.indexes[index]]


def require_space(folder: Path, needed: int, stage: str) -> None:
    """Refuse to start `stage` when `folder`'s file system has less than `needed` bytes free.

    Raises:
        DiskSpaceError: Names the stage, the folder, the space needed and the space free.
    """
    free = shutil.disk_usage(folder).free
    if free < needed + SPACE_MARGIN_BYTES:
        raise DiskSpaceError(
            f"{stage}: not enough disk space in {folder}: it needs {human_bytes(needed)} "
            f"and {human_bytes(free)} is free; free some space (`python -m catdog cache "
            "prune`) or put the artifacts on a larger disk (--artifacts)"
        )


class NpyRows:
    """Read-only rows of an `.npy` file, read from disk on each access.

    `leading` axes are flattened into the row index: a (views, n, dim) file read with
    `leading=2` has `views * n` rows of `dim` values, row `v * n + i` being view v of item i.
    """

    def __init__(self, path: str | os.PathLike[str], leading: int = 1) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, self.dtype = read_header(handle)
            self.offset = handle.tell()
        if fortran_order or len(shape) < leading:
            raise ValueError(f"{self.path}: expected a C-order array with {leading}+ axes")
        self.file_shape: tuple[int, ...] = tuple(shape)
        self._count = math.prod(self.file_shape[:leading])
        self.row_shape = self.file_shape[leading:]
        self.row_bytes = math.prod(self.row_shape) * self.dtype.itemsize
        expected = self.offset + self._count * self.row_bytes
        if self.path.stat().st_size != expected:
            raise OSError(
                f"{self.path} holds {self.path.stat().st_size} bytes where its header says "
                f"{expected}: the file is damaged (truncated?); remove it or refresh its stage"
            )
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._count, *self.row_shape)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int | slice | np.ndarray | Sequence[int]) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._count)
            if step == 1:
                out = np.empty((max(0, stop - start), *self.row_shape), self.dtype)
                self.read_into(out, start)
                return out
            index = np.arange(start, stop, step)
        if np.ndim(index) == 0:
            return self[[int(index)]][0]  # type: ignore[index]
        rows = np.asarray(index, dtype=np.int64)
        if rows.size and (rows.min() < -self._count or rows.max() >= self._count):
            raise IndexError(f"row index out of range for {self._count} rows of {self.path}")
        rows = np.where(rows < 0, rows + self._count, rows)
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        for position, row in enumerate(rows):
            self.read_into(out[position : position + 1], int(row))
        return out

    def read_into(self, out: np.ndarray, first_row: int) -> None:
        """Fill `out` (C-contiguous, whole rows) with the rows from `first_row` on."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        view = memoryview(out.reshape(-1).view(np.uint8))
        offset = self.offset + first_row * self.row_bytes
        while view.nbytes:
            done = os.preadv(self._fd, [view], offset)
            if done == 0:
                raise OSError(f"{self.path} ended early: the file was truncated while open")
            view, offset = view[done:], offset + done

    def load(self) -> np.ndarray:
        """Every row in memory; for small arrays (labels, a test split's figures)."""
        return self[:]

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


class NpyWriter:
    """Write an `.npy` file of known shape chunk by chunk, front to back.

    The header is numpy's own (the bytes `np.save` writes for the same array), rows are
    appended through the file rather than a memory map (mapped pages would count as this
    process's memory), and the file is complete only when every row was written: closing
    early raises. A full disk raises `DiskSpaceError` naming `purpose` and the bytes the file
    needs. As in `NpyRows`, `leading` axes are flattened into the row index: a (views, n,
    dim) file is written as `views * n` rows of `dim` values, view by view.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        shape: tuple[int, ...],
        dtype: np.dtype | type,
        purpose: str,
        leading: int = 1,
    ) -> None:
        self.path = Path(path)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.purpose = purpose
        self.total_bytes = math.prod(self.shape) * self.dtype.itemsize
        self.row_shape = self.shape[leading:]
        self._count = math.prod(self.shape[:leading])
        self._rows = 0
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": self.shape,
        }
        # The file's SHA-256 as it is written, so that no one reads it back to hash it.
        self._digest = hashlib.sha256()
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, header)
        with self._disk_errors():
            self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
            self._file.write(head.getvalue())
        self._digest.update(head.getvalue())

    @contextmanager
    def _disk_errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            if error.errno not in _NO_SPACE:
                raise
            raise DiskSpaceError(
                f"{self.purpose}: the disk filled up writing {self.path.name} in "
                f"{self.path.parent} ({error.strerror}); this file needs "
                f"{human_bytes(self.total_bytes)}; free some space (`python -m catdog cache "
                "prune`) or put the artifacts on a larger disk (--artifacts)"
            ) from error

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape or self._rows + len(rows) > self._count:
            raise ValueError(
                f"{self.path.name}: rows of shape {rows.shape} do not fit {self.shape} "
                f"after {self._rows} rows"
            )
        data = memoryview(rows.reshape(-1).view(np.uint8))
        with self._disk_errors():
            self._file.write(data)
        self._digest.update(data)
        self._rows += len(rows)

    @property
    def sha256(self) -> str:
        """The SHA-256 of the bytes written so far (of the whole file, once closed)."""
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._file.closed:
            return
        with self._disk_errors():
            self._file.close()
        if self._rows != self._count:
            raise ValueError(
                f"{self.path.name}: {self._rows} of {self._count} rows written; incomplete"
            )

    def abandon(self) -> None:
        """Close and remove the file, complete or not."""
        with suppress(OSError):
            self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            # The caller discards its working folder, and the partial file with it.
            with suppress(OSError):
                self._file.close()
