"""Atomic writes: a crash or a concurrent reader never sees a half-written artifact."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# A JSON object as `json.loads` returns it: where files and events meet the typed records
# (their to_json/from_json, the registry's history), whose keys only the JSON's readers know.
JsonObject = dict[str, Any]


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(data: Any, *, compact: bool = False) -> bytes:
    """The JSON every artifact is written as: indented, keys sorted, a final newline.

    `compact` (no indentation) for indexes of thousands of entries that people query rather
    than read (a manifest, the memo of every image's hash): Python's encoder is C only without
    indentation, 6 times as fast (0.05 s against 0.33 s for a manifest of 30,000 images).
    """
    if compact:
        return (json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def atomic_write_json(path: Path, data: Any, *, compact: bool = False) -> Path:
    return atomic_write_bytes(path, json_bytes(data, compact=compact))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final`; on success it becomes `final`.

    On failure the temporary folder is removed. If `final` appeared meanwhile (another run
    finished the same content-addressed work first), ours is discarded and theirs kept.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(source: Path, final: Path) -> None:
    """Move the finished folder `source` to `final`, replacing an older `final` if present."""
    final = Path(final)
    if final.exists():
        trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
        os.rename(source, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(source, final)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block's duration.

    An OS-level `flock`: released by the kernel when the holder exits or dies, so a killed run
    cannot leave it behind; two runs, or two threads of one run, take turns. On a network
    file system it holds only if that file system supports `flock` (NFSv4 does).
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def human_bytes(count: float) -> str:
    """`count` bytes in decimal units ("221.2 KB"), as disk sizes are usually quoted."""
    if count < 1000:
        return f"{count:.0f} bytes"
    for unit in ("KB", "MB"):
        count /= 1000
        if count < 1000:
            return f"{count:.1f} {unit}"
    return f"{count / 1000:.1f} GB"
