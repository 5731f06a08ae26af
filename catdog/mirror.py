"""Keeping a host's copy of an object store and the store itself in step (no Prefect).

The store is the truth; `layout.root` is this host's cache of it (see catdog.store). Sealed
stage outputs go up whole, the files first and `record.json` last (created once), together with
the per-image packs the record reads from; an output this host lacks comes down whole, every
file checked against the record's hashes before the record is put in place. The other files
(the registry, production, the summary and run reports) are pushed after they are written and
pulled before they are read. Every function does nothing for a local artifacts folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from catdog.hashing import sha256_file_uncached
from catdog.io import atomic_write_json, exclusive_lock, replace_directory
from catdog.layout import RECORD_FILE, RUNS_DIR, SUMMARY_FILE, Layout
from catdog.store import ObjectStore, StoreConflict, StoreError, is_store_url

log = logging.getLogger(__name__)

# Turns a run takes at production when other hosts keep changing it first (with a store).
TURNS = 5
INDEX_SUFFIX = ".json"  # a piece pack's index, beside its rows (catdog.pieces)


def _pack_index(rows: Path) -> Path:
    return rows.with_suffix(INDEX_SUFFIX)


def push_output(layout: Layout, folder: Path) -> bool:
    """Upload a sealed output at `folder`: the piece packs its record reads from, its files,
    then its record, created once. False, sending nothing, when the store holds this output
    already: sealed by another host first, it is the one every host uses."""
    store = layout.store
    if store is None:
        return True
    if store.exists(layout.relative(folder / RECORD_FILE)):
        return False
    record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
    packs = [layout.resolve(relative) for relative in record.get("piece_files", {})]
    stored: set[str] = set()  # packs never change: one the store has is not sent again
    for version in {pack.parent for pack in packs}:
        stored.update(store.list(layout.relative(version)))
    packs = [pack for pack in packs if layout.relative(_pack_index(pack)) not in stored]
    files = [path for path in sorted(folder.rglob("*")) if path.is_file()]
    files.remove(folder / RECORD_FILE)
    # A pack's index goes after its rows, as it does on disk: a reader trusts indexed packs.
    store.put_many(layout.root, [*packs, *files])
    store.put_many(layout.root, [_pack_index(pack) for pack in packs])
    return store.upload(folder / RECORD_FILE, layout.relative(folder / RECORD_FILE), create=True)


def fetch_output(layout: Layout, folder: Path) -> bool:
    """Download the output sealed at `folder` into this host's copy, checked file by file
    against its record; its record is the last thing put in place. False, leaving nothing
    behind, when the store has no such output or a file does not match its hash."""
    store = layout.store
    if store is None:
        return False
    relative = folder.relative_to(layout.root).as_posix()
    staged = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.fetch")
    try:
        if not store.download(f"{relative}/{RECORD_FILE}", staged / RECORD_FILE):
            return False
        record = json.loads((staged / RECORD_FILE).read_text(encoding="utf-8"))
        wanted: dict[str, tuple[Path, str]] = {
            f"{relative}/{name}": (staged / name, digest)
            for name, digest in record.get("files", {}).items()
        }
        packs: list[tuple[Path, Path]] = []  # (staged, final)
        for name, digest in record.get("piece_files", {}).items():
            final = layout.resolve(name)
            if (
                final.is_file()
                and _pack_index(final).is_file()
                and sha256_file_uncached(final) == digest
            ):
                continue
            rows = staged / ".packs" / name
            wanted[name] = (rows, digest)
            wanted[_pack_index(Path(name)).as_posix()] = (_pack_index(rows), "")
            packs.append((rows, final))
        try:
            store.get_many({remote: local for remote, (local, _) in wanted.items()})
        except FileNotFoundError:  # a record whose files are gone (a prune cut short)
            store.delete(f"{relative}/{RECORD_FILE}")  # sealed again by the run that needs it
            return False
        for local, digest in wanted.values():
            if digest and sha256_file_uncached(local) != digest:
                store.delete(f"{relative}/{RECORD_FILE}")  # damaged: sealed again by a run
                return False
        for rows, final in packs:  # rows first, then the index that makes them a pack
            final.parent.mkdir(parents=True, exist_ok=True)
            rows.replace(final)
            _pack_index(rows).replace(_pack_index(final))
        shutil.rmtree(staged / ".packs", ignore_errors=True)
        if (folder / RECORD_FILE).is_file():  # another task of this host fetched it meanwhile
            return True
        record_file = staged / RECORD_FILE
        holding = staged.with_name(staged.name + ".record")
        record_file.replace(holding)  # the record goes in after every file it lists
        replace_directory(staged, folder)
        holding.replace(folder / RECORD_FILE)
        return True
    except FileNotFoundError:
        return False
    finally:
        shutil.rmtree(staged, ignore_errors=True)
        staged.with_name(staged.name + ".record").unlink(missing_ok=True)


def adopt_sealed(layout: Layout, folder: Path) -> bool:
    """Replace this host's output at `folder` with the store's copy of it (sealed by another
    host first); False, keeping this host's, when that copy cannot be fetched whole."""
    aside = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.ours")
    folder.rename(aside)
    if fetch_output(layout, folder):
        shutil.rmtree(aside, ignore_errors=True)
        return True
    aside.rename(folder)
    return False


def read_record(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / RECORD_FILE).read_text(encoding="utf-8")))


def push_files(layout: Layout, paths: Iterable[Path]) -> None:
    """Upload files of this host's copy in the order given; a folder, every file under it
    but this host's own (dot files: locks, temporary names)."""
    if layout.store is None:
        return
    for path in paths:
        if path.is_dir():
            layout.store.put_many(layout.root, _files_under(path))
        elif path.is_file():
            layout.store.upload(path, layout.relative(path))


def address(layout: Layout, path: Path) -> str:
    """Where a file of this host's copy is for everyone: its URL in the store, or its path."""
    return f"{layout.store.url}/{layout.relative(path)}" if layout.store else str(path)


def local_copy(layout: Layout, location: str, *, with_folder: bool = False) -> str:
    """The file at `location` (an `address`) in this host's copy, fetched from the store
    (`with_folder`: with every file beside it); a local path as it is."""
    if layout.store is None or not location.startswith(f"{layout.store.url}/"):
        return location
    path = layout.resolve(location.removeprefix(f"{layout.store.url}/"))
    pull_files(layout, [path.parent if with_folder else path])
    return str(path)


def pull_files(layout: Layout, paths: Iterable[Path]) -> None:
    """Download files (a folder: every object under it) into this host's copy, replacing
    what it holds; a path the store lacks is left as it is."""
    store = layout.store
    if store is None:
        return
    for path in paths:
        relative = layout.relative(path)
        listed = store.list(relative)
        if not listed:
            continue
        store.get_many({name: layout.resolve(name) for name in listed})


@contextmanager
def production_turn(layout: Layout) -> Iterator[None]:
    """Hold production for one change: the registry, the models it names and the copies of
    the current one, on this host and, with a store, between hosts.

    On this host runs take turns by a lock file. With a store, the turn begins by pulling the
    store's registry (remembering its ETag) and the archived models. When the block has
    decided something (the registry changed), this turn's new archives are created in the
    store (their names are the turn's own, so none can exist), then the registry is written
    only if the store's is still the one pulled (`If-Match`), then the copies of the current
    model people look at. A turn that lost the race raises StoreConflict and drops what it
    wrote on this host; the caller takes another turn on the winner's registry. A turn that
    decided nothing writes nothing.
    """
    with exclusive_lock(layout.gate_lock):
        store = layout.store
        if store is None:
            yield
            return
        registry_name = layout.relative(layout.registry)
        found = store.read_json(registry_name)
        pulled, etag = found if found is not None else (None, None)
        if pulled is None:
            layout.registry.unlink(missing_ok=True)
        else:
            atomic_write_json(layout.registry, pulled)
        archives = layout.production_dir / "models"
        _match_archives(layout, archives)
        before = set(_files_under(archives))
        uploaded: list[str] = []
        try:
            yield
            decided = _read_json_file(layout.registry)
            if decided is None or decided == pulled:
                return
            new = sorted(set(_files_under(archives)) - before)
            for path in new:
                if not store.upload(path, layout.relative(path), create=True):
                    raise StoreConflict(f"{store.key(layout.relative(path))} exists already")
                uploaded.append(layout.relative(path))
            store.write_json(registry_name, decided, if_match=etag)
        except BaseException:
            decided = _read_json_file(layout.registry)
            changed = decided is not None and decided != pulled
            _forget_turn(layout, sorted(set(_files_under(archives)) - before), changed)
            with contextlib.suppress(Exception):  # what stays is garbage, never a wrong result
                _drop_uploads(store, registry_name, uploaded, decided)
            raise
        current = [
            path
            for path in layout.production_dir.iterdir()
            if path.name not in ("models", layout.registry.name) and not path.name.startswith(".")
        ]
        push_files(layout, sorted(current))
        if not layout.production_export.exists():  # a model without exports: none may stay
            store.delete_tree(layout.relative(layout.production_export))


def _drop_uploads(store: ObjectStore, registry: str, uploaded: list[str], decided: Any) -> None:
    """Remove the archives a turn that did not commit uploaded: their names are the turn's
    own, which only its decision names. Unless that decision is the store's registry after
    all (a write that landed but whose reply was lost)."""
    if not uploaded:
        return
    found = store.read_json(registry)
    if found is not None and found[0] == decided:
        return
    store.delete_objects(tuple(uploaded))


def _read_json_file(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _forget_turn(layout: Layout, written: list[Path], decided: bool) -> None:
    """Drop what a turn that did not commit wrote on this host: its archives and, if it had
    decided, the copies of the model it made current (the store's registry names what is)."""
    for path in written:
        path.unlink(missing_ok=True)
    for folder in {path.parent for path in written if path.parent.name.endswith(".export")}:
        shutil.rmtree(folder, ignore_errors=True)
    if decided:
        layout.registry.unlink(missing_ok=True)
        layout.production_model.unlink(missing_ok=True)
        shutil.rmtree(layout.production_export, ignore_errors=True)


def _files_under(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(folder).parts)
    )


def _match_archives(layout: Layout, archives: Path) -> None:
    """Make this host's archived models those of the store: fetch what it lacks, drop what
    the store does not have (a turn that lost a race)."""
    store = layout.store
    assert store is not None
    listed = set(store.list(layout.relative(archives)))
    for path in _files_under(archives):
        if layout.relative(path) not in listed:
            path.unlink()
    missing = {name: layout.resolve(name) for name in listed if not layout.resolve(name).is_file()}
    store.get_many(missing)


def pull_run_summaries(layout: Layout) -> None:
    """Every finished run's summary in the store that this host's copy lacks, dated as the
    store dates it (a summary never changes once written)."""
    store = layout.store
    if store is None:
        return
    depth = RUNS_DIR.count("/") + 2  # <runs>/<run>/summary.json
    listed = store.listing(RUNS_DIR)
    wanted = {
        name: local
        for name in listed
        if name.endswith(f"/{SUMMARY_FILE}") and name.count("/") == depth
        if not (local := layout.resolve(name)).is_file()
    }
    store.get_many(wanted)
    for name, local in wanted.items():
        if listed[name].modified:
            os.utime(local, (listed[name].modified, listed[name].modified))


def pull_production(layout: Layout) -> None:
    """The store's registry and the model it names current (its archive and its exports),
    into this host's copy; archives are immutable, so what this host holds is not fetched
    again."""
    store = layout.store
    if store is None:
        return
    with exclusive_lock(layout.gate_lock):  # not while a turn on this host decides
        found = store.read_json(layout.relative(layout.registry))
        if found is not None:
            _pull_current(layout, store, found[0])


def _pull_current(layout: Layout, store: ObjectStore, registry: dict[str, Any]) -> None:
    named = [str(name) for name in (registry.get("archive"), registry.get("exports")) if name]
    wanted: dict[str, Path] = {}
    if named:  # the archive, the files kept beside it (`<archive>.<name>`), its exports
        for name in store.list(layout.relative(layout.production_dir / "models")):
            if name.startswith(tuple(named)) and not layout.resolve(name).is_file():
                wanted[name] = layout.resolve(name)
    store.get_many(wanted)
    atomic_write_json(layout.registry, registry)  # last: it names what is now here


def fetch_inputs(layout: Layout, values: Iterable[Any]) -> None:
    """Make every stage output that `values` name (stage records, and whatever holds them)
    present in this host's copy, fetched from the store where it is not: a task on a host
    that did not compute its inputs reads them as local files all the same.

    Raises:
        StoreError: An output named is neither here nor in the store.
    """
    if layout.store is None:
        return
    for named in sorted(set(_named_outputs(list(values)))):
        if _here_or_fetched(layout, named):
            continue
        raise StoreError(
            f"{named}: a stage output this task reads is neither in this host's copy "
            f"({layout.root}) nor in the store {layout.store.url}"
        )


def _here_or_fetched(layout: Layout, named: str) -> bool:
    """True when the output folder holding `named` (itself, or a folder above it: outputs
    are `<stage>/<key>` or `<stage>/<model>/<key>`) is here or came from the store."""
    parts = Path(named).parts
    candidates = [Path(*parts[:depth]) for depth in range(2, min(len(parts), 3) + 1)]
    for candidate in candidates:
        if (layout.root / candidate / RECORD_FILE).is_file():
            return True
    return any(fetch_output(layout, layout.root / candidate) for candidate in candidates)


def _named_outputs(values: list[Any]) -> Iterator[str]:
    """The artifacts-relative folders that records in `values` name: their `dir`, and a
    relative `root` (the extracted images a manifest is relative to; not a folder used in
    place, nor a folder in another store, which `catdog.data.store_source` mirrors)."""
    pending = list(values)
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list | tuple):
            pending.extend(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for entry in dataclasses.fields(value):
                found = getattr(value, entry.name)
                if entry.name in ("dir", "root") and isinstance(found, str):
                    if found and not Path(found).is_absolute() and not is_store_url(found):
                        yield found
                elif not isinstance(found, str | int | float | bool | type(None)):
                    pending.append(found)


# Training checkpoints ---------------------------------------------------------------------

CHECKPOINT_SECONDS = 30.0  # the least time between two checkpoints of a training
CHECKPOINT_FILE = "checkpoint.json"  # {"epoch", "files": {name: sha256}, "by"}: written last


class Checkpoints:
    """Sends a training's working folder (Keras's backup, the epochs so far, the best model)
    to the store after each epoch, so that another host can go on from the last one.

    Each epoch's copy goes under `<working folder>/epoch-<N>/` and `checkpoint.json` names it
    once it is whole. Uploads run in a background thread, one at a time, from a copy taken at
    the epoch's end: training does not wait for the network. The first epoch is sent, then the
    first to end CHECKPOINT_SECONDS after the last one sent began (and its upload finished), so
    a host lost mid-training costs at most that long and an epoch, and short epochs do not
    spend their time copying. A checkpoint is best effort: a failure is logged and the
    training goes on.
    """

    def __init__(self, layout: Layout, folder: Path) -> None:
        self.layout = layout
        self.folder = folder
        self.staging = folder.with_name(f"{folder.name}.upload")
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._last = -math.inf  # when the last checkpoint began (the first epoch's always does)

    def epoch_done(self, epoch: int) -> None:
        if self.layout.store is None or (self._thread and self._thread.is_alive()):
            return
        if time.monotonic() - self._last < CHECKPOINT_SECONDS:
            return
        self._last = time.monotonic()
        self._report()
        try:
            shutil.rmtree(self.staging, ignore_errors=True)
            shutil.copytree(self.folder, self.staging / f"epoch-{epoch:04d}")
        except OSError as error:  # a full disk: no checkpoint this epoch, the training goes on
            self._failure = error
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        self._thread = threading.Thread(target=self._upload, args=(epoch,), daemon=True)
        self._thread.start()

    def _upload(self, epoch: int) -> None:
        store = self.layout.store
        assert store is not None
        base = self.layout.relative(self.folder)
        copy = self.staging / f"epoch-{epoch:04d}"
        try:
            found = store.read_json(f"{base}/{CHECKPOINT_FILE}")
            last = int(found[0]["epoch"]) if found is not None else 0
            if last >= epoch:  # a host that went on from here is ahead: it stays
                return
            files = sorted(path for path in copy.rglob("*") if path.is_file())
            remote = [f"{base}/{path.relative_to(self.staging).as_posix()}" for path in files]
            store.put_files([str(p) for p in files], [store.key(name) for name in remote])
            digests = {p.relative_to(copy).as_posix(): sha256_file_uncached(p) for p in files}
            by = f"{socket.gethostname()}:{os.getpid()}"  # which host and process, for people
            store.pipe(f"{base}/{CHECKPOINT_FILE}", {"epoch": epoch, "files": digests, "by": by})
            if last:
                store.delete_tree(f"{base}/epoch-{last:04d}")
        except Exception as error:  # the training goes on; the next epoch tries again
            self._failure = error
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)

    def _report(self) -> None:
        if self._failure is not None:
            log.warning("a checkpoint did not reach the store: %s", self._failure)
            self._failure = None

    def close(self) -> None:
        """Wait for an upload under way; then the training's output is sealed instead."""
        if self._thread is not None:
            self._thread.join()
        self._report()
        shutil.rmtree(self.staging, ignore_errors=True)


def pull_checkpoint(layout: Layout, folder: Path) -> int | None:
    """Another host's last checkpoint of the training working in `folder`, into it, when this
    host has no epochs of its own there; returns its epoch (None: nothing pulled)."""
    store = layout.store
    if store is None or any(folder.glob("*-epochs.json")):
        return None
    base = layout.relative(folder)
    found = store.read_json(f"{base}/{CHECKPOINT_FILE}")
    if found is None:
        return None
    epoch, digests = int(found[0]["epoch"]), dict(found[0]["files"])
    if not digests:
        return None
    staged = folder.with_name(f"{folder.name}.{uuid.uuid4().hex}.fetch")
    try:
        store.get_many({f"{base}/epoch-{epoch:04d}/{name}": staged / name for name in digests})
        if any(sha256_file_uncached(staged / name) != digest for name, digest in digests.items()):
            return None
        replace_directory(staged, folder)
    except FileNotFoundError:
        return None
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return epoch


def forget_checkpoints(layout: Layout, folder: Path) -> None:
    """Remove a finished training's checkpoints from the store: its output is sealed."""
    if layout.store is not None:
        layout.store.delete_tree(layout.relative(folder))


# A run's stop request, for its stages on hosts that share only the store ---------------------


def send_stop_request(layout: Layout, request: Path, reason: str) -> None:
    """Put a run's stop request (see `Layout.stop_request`) in the store too, so that its
    stages on other hosts stop; best effort: a store that fails is the run's to report."""
    if layout.store is None or not layout.store.answering():
        return
    try:
        layout.store.pipe(layout.relative(request), {"reason": reason})
    except Exception as error:
        log.warning("could not ask the run's stages on other hosts to stop (%s)", error)


def stored_stop_request(layout: Layout, request: Path) -> str | None:
    """The reason of a run's stop request in the store; None when there is none, or when the
    store cannot say (a stage then goes on: stopping is an economy, not a safeguard)."""
    if layout.store is None or not layout.store.answering():
        return None
    try:
        found = layout.store.read_json(layout.relative(request))
    except Exception:
        return None
    if found is None or not isinstance(found[0], dict):
        return None
    return str(found[0].get("reason", "the run is stopping"))


def withdraw_stop_request(layout: Layout, request: Path) -> None:
    """Remove a finished run's stop request from the store (best effort)."""
    if layout.store is None or not layout.store.answering():
        return
    try:
        layout.store.delete(layout.relative(request))
    except Exception as error:
        log.warning("could not remove the run's stop request from the store (%s)", error)
