"""Content hashes for files, folders, JSON-able values and the library's own source code."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from catdog.errors import ImageChangedError
from catdog.io import atomic_write_json

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_checked(path: Path, sha256: str) -> bytes:
    """The bytes of `path`, which must be those whose SHA-256 is `sha256` (an image the
    manifest hashed earlier in the run).

    Raises:
        ImageChangedError: They are not: the file changed since it was hashed.
    """
    data = Path(path).read_bytes()
    if sha256_bytes(data) != sha256:
        raise ImageChangedError(
            f"{path} changed after this run's manifest read it (its bytes no longer have the "
            "hash the manifest recorded); run again once the folder has stopped changing"
        )
    return data


def canonical_json(value: Any) -> bytes:
    """The bytes `sha256_json` hashes: compact JSON, keys sorted."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")


def sha256_json(value: Any) -> str:
    """Hash a JSON-able value independently of dict ordering."""
    return sha256_bytes(canonical_json(value))


def code_digest(code: str | ast.AST) -> str:
    """Hash of Python source as the interpreter reads it: comments, blank lines and layout do
    not count (docstrings do)."""
    tree = ast.parse(code) if isinstance(code, str) else code
    return sha256_bytes(ast.unparse(tree).encode("utf-8"))


def sha256_file_uncached(path: Path) -> str:
    """SHA-256 of a file's bytes, read now (for files that are still changing)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HashMemo:
    """Remembers file hashes by (path, size, mtime) so that unchanged files are hashed once.

    Persisted as JSON when `store` is given, so a fully cached rerun does not re-read gigabytes.
    """

    def __init__(self, store: Path | None = None) -> None:
        self._store = Path(store) if store else None
        self._lock = threading.Lock()
        self._entries: dict[str, list[Any]] = {}
        self._dirty = False
        self._real_dirs: dict[str, str] = {}
        # The stored file as this memo last read or wrote it: unchanged since, it holds
        # nothing this memo lacks, and saving need not read it again (a memo of 30,000 images
        # is 6 MB of JSON).
        self._seen: tuple[int, int, int] | None = None
        if self._store and self._store.is_file():
            try:
                self._seen = self._stored_stamp()
                self._entries = json.loads(self._store.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self._entries = {}
                self._seen = None

    def _stored_stamp(self) -> tuple[int, int, int] | None:
        assert self._store is not None
        try:
            stat = os.stat(self._store)
        except FileNotFoundError:
            return None
        return stat.st_size, stat.st_mtime_ns, stat.st_ino

    def _canonical(self, path: str | Path) -> str:
        # Resolving each folder once, not each file, matters: a record lists thousands of images
        # (and a manifest 30,000, where normalising each path took a tenth of a second).
        folder, name = os.path.split(os.fspath(path))
        if not os.path.isabs(folder) or name in ("", ".", ".."):
            folder, name = os.path.split(os.path.abspath(path))
        real = self._real_dirs.get(folder)
        if real is None:
            real = self._real_dirs[folder] = os.path.realpath(folder)
        return os.path.join(real, name)

    def sha256(self, path: Path) -> str:
        key = self._canonical(path)
        stat = os.stat(key)
        stamp = [stat.st_size, stat.st_mtime_ns]
        with self._lock:
            known = self._entries.get(key)
        if known and known[:2] == stamp:
            return str(known[2])
        digest = sha256_file_uncached(Path(key))
        with self._lock:
            self._entries[key] = [*stamp, digest]
            self._dirty = True
        return digest

    def known(self, path: str | Path) -> str | None:
        """The hash `note` remembered for `path` as it is now, without reading it: the same
        file (inode), size, modification and change times; None when it is new or changed."""
        return self.known_all([path])[0]

    def known_all(self, paths: Sequence[str | Path]) -> list[str | None]:
        """`known` of each of `paths`, in order. A manifest asks about every image of the
        dataset on every run: one call keeps the per-file cost to a lookup and a stat."""
        entries = self._entries  # looked up, never iterated: no lock, no copy
        found: list[str | None] = []
        folders: dict[str, str] = {}  # a folder as given: its canonical form
        for path in paths:
            # Images come a folder at a time: each folder is made canonical once, not each path.
            folder, sep, name = os.fspath(path).rpartition(os.sep)
            folder = folder or sep  # "/name": the root folder
            real = folders.get(folder)
            if real is None:
                real = folders[folder] = self._canonical(os.path.join(folder, "_"))[:-1]
            key = real + name if name not in ("", ".", "..") else self._canonical(path)
            known = entries.get(key)
            if not known or len(known) != 5:  # none, or only `sha256`'s (size, mtime)
                found.append(None)
                continue
            try:
                stamp = _stamp(os.stat(key))
            except OSError:
                found.append(None)
                continue
            found.append(str(known[2]) if known[:2] + known[3:] == stamp else None)
        return found

    def note(self, path: str | Path, digest: str, stat: os.stat_result) -> None:
        """Remember `digest` for `path` as `stat` (taken before its bytes were read) saw it."""
        size, mtime, inode, ctime = _stamp(stat)
        with self._lock:
            self._entries[self._canonical(path)] = [size, mtime, digest, inode, ctime]
            self._dirty = True

    def save(self) -> None:
        """Write the memo, merged with what other processes wrote since it was read (the
        artifacts folder may be shared by the workers of a cluster): a memo written by
        another process in between keeps its entries, and each write is atomic."""
        if self._store and self._dirty:
            with self._lock:
                on_disk: dict[str, list[Any]] = {}
                if self._seen is None or self._stored_stamp() != self._seen:
                    try:
                        on_disk = json.loads(self._store.read_text(encoding="utf-8"))
                    except (OSError, ValueError):
                        on_disk = {}
                self._entries = {**on_disk, **self._entries}
                atomic_write_json(self._store, self._entries, compact=True)
                self._seen = self._stored_stamp()
                self._dirty = False


def _stamp(stat: os.stat_result) -> list[int]:
    """What says a file is unchanged, short of reading it: size, modification time, inode
    (a file replaced by another) and change time (a copy that kept the old modification
    time changes it)."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]


_default_memo = HashMemo()


def sha256_file(path: Path, memo: HashMemo | None = None) -> str:
    """SHA-256 of a file's bytes (memoised by path, size and modification time)."""
    return (memo or _default_memo).sha256(path)


def folder_fingerprint(root: Path) -> str:
    """A cheap fingerprint of a folder tree: every file's relative path, size and mtime.

    Used to notice that a user's image folder changed without reading every image.
    """
    root = Path(root)
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            stat = full.stat()
            rows.append([full.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    return sha256_json(rows)


def _module_source_path(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _is_module(base: str, name: str) -> bool:
    """Whether `from base import name` names a module, judged from files without importing."""
    path = _module_source_path(base)
    if path is None or path.name != "__init__.py":
        return False
    return (path.parent / f"{name}.py").is_file() or (path.parent / name / "__init__.py").is_file()


def _catdog_imports(source: str, module: str) -> set[str]:
    """The `catdog` modules a source file imports, resolved to module names."""
    found: set[str] = set()
    package = module.rsplit(".", 1)[0] if "." in module else module
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "catdog")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if base.split(".")[0] != "catdog":
                continue
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if _is_module(base, a.name))
    return found


@cache
def _module_digest(module: str) -> tuple[str, frozenset[str]]:
    """A module's source hash and the `catdog` modules it imports (parsed once per process)."""
    path = _module_source_path(module)
    if path is None:
        return "", frozenset()
    source = path.read_text(encoding="utf-8")
    return code_digest(source), frozenset(_catdog_imports(source, module))


# Modules that say where results are stored and how they are described, not how they are
# computed: a stage's key does not follow imports into them, so that adding a stage, a record
# field or a default of another stage does not retrain every model. Every value of
# catdog.config that changes a result reaches its stage as a keyed input.
NOT_RESULT_CODE = frozenset(
    {
        "catdog.config",
        "catdog.errors",
        "catdog.io",
        "catdog.layout",
        "catdog.stage_records",
        "catdog.stages",
    }
)


@cache
def code_fingerprint(*modules: str) -> str:
    """Hash the source of `modules` and of every `catdog` module they import, transitively
    (but `NOT_RESULT_CODE`).

    Editing a library function therefore invalidates exactly the pipeline stages whose code
    reaches it, without importing anything (TensorFlow stays unloaded on a cached run).
    """
    seen: dict[str, str] = {}
    pending = list(modules)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen[name], imports = _module_digest(name)
        pending.extend(imports - seen.keys() - NOT_RESULT_CODE)
    return sha256_json(sorted(seen.items()))
