"""File locks for Prefect's cache that a crashed run cannot leave behind.

Runs (and the workers of a Dask cluster) that share an artifacts folder take turns computing
one cache key: SERIALIZABLE isolation asks a lock manager for the key, and a second run waits,
then finds the first one's result. Prefect's own file locks never expire, so a run killed while
holding one (a kill, an out-of-memory crash, a lost host) would make every later run wait
forever. This manager implements Prefect's public `LockManager` protocol with lock files that
name the process holding them ("host:pid"), which that process touches every
HEARTBEAT_SECONDS. A lock is free again when its process, on this machine, no longer exists;
or, held from another machine, when it has not been touched for `hold_timeout()` seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

from catdog.io import exclusive_lock
from catdog.leases import STORE_LEASES, Leases
from catdog.processes import (  # noqa: F401 - HOLD_TIMEOUT_ENV and Heartbeat: the lock's API
    HEARTBEAT,
    HOLD_TIMEOUT_ENV,
    Heartbeat,
    process_is_gone,
    this_process,
)
from catdog.store import StoreFault

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1
UNNAMED_TIMEOUT = 60.0  # seconds after which a lock file naming no holder is abandoned


class LockContent(TypedDict, total=False):
    """A lock file's JSON; empty while its creator has not written it (or another tool's)."""

    holder: str  # the holder Prefect names
    process: str  # "host:pid:start" of the process holding it
    expires: float | None  # when the hold ends (time.time()); None: held until released


class ArtifactsLockManager:
    """Prefect's `LockManager` protocol over lock files in one folder, one file per key.

    A lock file appears whole (written, then hard-linked into place, which fails if it exists)
    and holds JSON: the holder Prefect names, the process ("host:pid:start") and, if asked
    for, when the hold expires.
    """

    wait_poll_seconds = POLL_SECONDS  # between a waiter's looks at the lock

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def __eq__(self, other: object) -> bool:  # Prefect compares the managers of two policies
        return isinstance(other, ArtifactsLockManager) and other.directory == self.directory

    def __hash__(self) -> int:
        return hash(self.directory)

    def lock_file(self, key: str) -> Path:
        return self.directory / f"{key}.lock"

    def _read(self, key: str) -> LockContent | None:
        """The lock's content; {} while its creator has not written it yet; None if free."""
        try:
            text = self.lock_file(key).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return dict(json.loads(text)) if text else {}
        except ValueError:
            return {}

    def _abandoned(self, key: str, content: LockContent) -> bool:
        path = self.lock_file(key)
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        if content.get("expires") is not None and time.time() > float(content["expires"]):
            return True
        owner = content.get("process")
        if not owner:  # no holder named (a lock file of another tool, or damaged) for long
            return age > UNNAMED_TIMEOUT
        return process_is_gone(str(owner), age)

    def _clear_if_abandoned(self, key: str) -> bool:
        """Remove the lock if its holder is gone; True if it is free now. Checked again under
        a guard, so that two waiters never remove a lock that one of them just took."""
        content = self._read(key)
        if content is None:
            return True
        if not self._abandoned(key, content):
            return False
        with exclusive_lock(self.directory / ".abandoned.guard"):
            content = self._read(key)
            if content is None:
                return True
            if not self._abandoned(key, content):
                return False
            log.warning(
                "releasing the lock on %s left by %s, which is gone", key, content.get("process")
            )
            self.lock_file(key).unlink(missing_ok=True)
        return True

    def _try_acquire(self, key: str, holder: str, hold_timeout: float | None) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.lock_file(key)
        expires = time.time() + hold_timeout if hold_timeout is not None else None
        # Written whole under a name of its own, then linked into place: the lock file appears
        # with its holder in it, or not at all (a crash in between leaves only the draft).
        draft = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        draft.write_text(
            json.dumps({"holder": holder, "process": this_process(), "expires": expires}),
            encoding="utf-8",
        )
        try:
            os.link(draft, path)
        except FileExistsError:
            content = self._read(key)
            return bool(content) and content.get("holder") == holder
        finally:
            draft.unlink(missing_ok=True)
        HEARTBEAT.hold(path)
        return True

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            if self._try_acquire(key, holder, hold_timeout):
                return True
            if self._clear_if_abandoned(key):
                continue
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        return await asyncio.to_thread(
            self.acquire_lock, key, holder, acquire_timeout, hold_timeout
        )

    def release_lock(self, key: str, holder: str) -> None:
        content = self._read(key)
        if not content or content.get("holder") != holder:
            raise ValueError(f"no lock on {key} is held by {holder}")
        path = self.lock_file(key)
        HEARTBEAT.drop(path)
        path.unlink(missing_ok=True)

    def is_locked(self, key: str) -> bool:
        return self.held_here(key)

    def held_here(self, key: str) -> bool:
        """Whether a process of this host holds the lock (its lock file)."""
        return not self._clear_if_abandoned(key)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        content = self._read(key)
        if not content or content.get("holder") != holder:
            return False
        return content.get("expires") is None or time.time() <= float(content["expires"])

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.wait_poll_seconds)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.wait_for_lock, key, timeout)


STORE_POLL_SECONDS = 0.5  # a waiter's look at the store's lease: a request each time


class StoreLockManager(ArtifactsLockManager):
    """Locks of an artifacts store's entries, between processes and between hosts.

    This host's processes take turns through its lock files (`ArtifactsLockManager`, which
    frees a dead process's lock at once); the holder then takes the entry's lease in the store
    (`catdog.leases`), for which the hosts take turns. A host that waited finds what the
    holder sealed: `on_acquired(key)` runs once the lock is held, before Prefect looks for the
    entry's cache record, and fetches the sealed output if there is one.
    """

    wait_poll_seconds = STORE_POLL_SECONDS  # each look reads the lease in the store

    def __init__(
        self,
        directory: str | os.PathLike[str],
        url: str,
        on_acquired: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(directory)
        self.url = url
        self.on_acquired = on_acquired
        self._leases: Leases | None = None

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StoreLockManager)
            and other.directory == self.directory
            and other.url == self.url
        )

    def __hash__(self) -> int:
        return hash((self.directory, self.url))

    def __getstate__(self) -> dict[str, object]:
        # Sent to Dask workers with the task: each process opens the store and its leases.
        return {**self.__dict__, "_leases": None}

    @property
    def leases(self) -> Leases:
        if self._leases is None:
            self._leases = _leases_of(self.url)
        return self._leases

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        if not super().acquire_lock(key, holder, acquire_timeout, hold_timeout):
            return False
        try:
            if not self.leases.store.answering():  # each try would wait out its retries
                raise StoreFault("it did not answer a moment ago")
            while not self.leases.try_take(key, holder):
                if deadline is not None and time.monotonic() >= deadline:
                    super().release_lock(key, holder)
                    return False
                time.sleep(STORE_POLL_SECONDS)
        except Exception as error:
            # The lease is an economy (an output is sealed once, whoever computes it): the
            # stage goes on under this host's lock, and meets the store's failure if it lasts.
            log.warning("%s: no lease in the store (%s); computing it all the same", key, error)
        except BaseException:
            super().release_lock(key, holder)
            raise
        else:
            if self.on_acquired is not None:
                self.on_acquired(key)
        # The holder is the one its lock file names (`is_lock_holder`), whether or not its
        # lease outlives a long stall: a lost lease costs a computation done twice.
        return True

    def release_lock(self, key: str, holder: str) -> None:
        try:
            self.leases.release(key, holder)  # nothing to do for a lock without a lease
        finally:
            super().release_lock(key, holder)

    def is_locked(self, key: str) -> bool:
        if super().is_locked(key):
            return True
        try:
            return self.leases.store.answering() and self.leases.is_held(key)
        except Exception:  # what the store cannot say, a waiter does not wait for
            return False


_LEASES: dict[str, Leases] = {}
_LEASES_GUARD = threading.Lock()


def _leases_of(url: str) -> Leases:
    """One `Leases` per store per process: the renewal thread serves every lock it holds."""
    from catdog.layout import Layout

    with _LEASES_GUARD:
        if url not in _LEASES:
            store = Layout.at(url).store
            assert store is not None, f"{url} is not an object store"
            _LEASES[url] = Leases(store, STORE_LEASES)
        return _LEASES[url]
