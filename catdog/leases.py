"""Leases in an object store: a lock between hosts that share nothing but the store (no
Prefect).

A lease is a small JSON object, created only if absent (S3's `If-None-Match: *`), that names
its holder. The holder's process renews it (`If-Match` on its ETag) every `renew_every`
seconds while it holds it. Another host takes it over only after seeing the same version,
unrenewed, for `expiry` seconds of its own clock (no two hosts' clocks are compared), and then
only by a compare-and-swap on that version, so two waiters never both win. A lease whose
holder is a process of this machine that has ended is taken over at once.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from catdog.processes import HEARTBEAT_SECONDS, process_is_gone, this_process
from catdog.store import ObjectStore, StoreConflict

log = logging.getLogger(__name__)


@dataclass
class _Held:
    relative: str
    content: dict[str, Any]
    etag: str
    writing: threading.Lock = field(default_factory=threading.Lock)  # renewal or release


# Seconds a lease stays unrenewed before another host takes it over. Short: a lease taken
# over too early costs a computation done twice (a sealed output is created once, and the
# first seal is the one every host uses), never a wrong result; a lost host's work should not
# wait long for another.
LEASE_EXPIRY = 60.0
STORE_LEASES = ".prefect/locks"  # the folder of the artifacts' leases, in their store
READ_ATTEMPTS = 5


class Leases:
    """The leases of one store's folder `prefix`, as this process sees and holds them."""

    def __init__(self, store: ObjectStore, prefix: str, expiry: float = LEASE_EXPIRY) -> None:
        self.store = store
        self.prefix = prefix.strip("/")
        self.expiry = expiry
        self.renew_every = min(HEARTBEAT_SECONDS, expiry / 4)
        self._held: dict[str, _Held] = {}
        self._seen: dict[str, tuple[str, float]] = {}  # name -> (ETag, first seen, monotonic)
        self._guard = threading.Lock()
        self._renewer: threading.Thread | None = None

    def _relative(self, name: str) -> str:
        return f"{self.prefix}/{name}.lease"

    def _read(self, relative: str) -> tuple[dict[str, Any], str] | None:
        """The lease as it is now ({} for a body that is not a lease's): read again when it
        changed between the look at its version and the read of its body (a renewal)."""
        for attempt in range(READ_ATTEMPTS):
            try:
                found = self.store.read_json(relative)
                break
            except StoreConflict:
                if attempt == READ_ATTEMPTS - 1:
                    raise
        if found is None:
            return None
        value, etag = found
        return (value if isinstance(value, dict) else {}), etag

    def _write(self, relative: str, content: dict[str, Any], if_match: str | None) -> str | None:
        """Write the lease only over version `if_match` (None: only if absent); its new
        version, or None when another writer came first. A write whose reply was lost, and
        that the store's client then tried again and saw refused, is recognised as this
        one's by its content."""
        try:
            return self.store.write_json(relative, content, if_match=if_match)
        except StoreConflict:
            current = self._read(relative)
            if current is not None and current[0] == content:
                return current[1]
            return None

    def try_take(self, name: str, holder: str) -> bool:
        """Take the lease `name` for `holder` if it is free, held by `holder` already, or
        abandoned; False while another holder keeps it (one read, for a waiter)."""
        # A token of this take: no two takes write the same content.
        content = {"holder": holder, "process": this_process(), "token": uuid.uuid4().hex}
        relative = self._relative(name)
        current = self._read(relative)
        if current is None:
            etag = self._write(relative, content, None)
        else:
            value, etag_now = current
            if value.get("holder") == holder and name in self._held:
                return True
            if not self._abandoned(name, value, etag_now):
                return False
            etag = self._write(relative, content, etag_now)
            if etag is not None:
                log.warning(
                    "took over the lease on %s from %s, which stopped renewing it",
                    name,
                    value.get("process"),
                )
        if etag is None:
            return False  # taken, renewed or released by another first: the caller tries again
        with self._guard:
            self._held[name] = _Held(relative, content, etag)
            self._seen.pop(name, None)
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(
                    target=self._renew, name="lease-renewal", daemon=True
                )
                self._renewer.start()
        return True

    def _abandoned(self, name: str, value: dict[str, Any], etag: str) -> bool:
        owner = str(value.get("process", ""))
        if owner.partition(":")[0] == socket.gethostname() and process_is_gone(owner, 0.0):
            return True  # a process of this machine that has ended
        with self._guard:
            seen = self._seen.get(name)
            if seen is None or seen[0] != etag:
                self._seen[name] = (etag, time.monotonic())
                return False
        return time.monotonic() - seen[1] > self.expiry

    def is_held(self, name: str) -> bool:
        """Whether some holder keeps the lease (renewing it, as far as this process saw)."""
        if name in self._held:
            return True
        current = self._read(self._relative(name))
        return current is not None and not self._abandoned(name, *current)

    def holds(self, name: str, holder: str) -> bool:
        with self._guard:
            held = self._held.get(name)
        return held is not None and held.content.get("holder") == holder

    def release(self, name: str, holder: str) -> None:
        with self._guard:
            held = self._held.get(name)
            if held is None or held.content.get("holder") != holder:
                return
        with held.writing:  # not while a renewal is changing its version
            with self._guard:
                self._held.pop(name, None)
            if not self.store.answering():
                return  # unrenewed, it expires; each try would wait out the store's retries
            try:
                current = self._read(held.relative)
                if current is not None and current[1] == held.etag:  # still ours
                    self.store.delete(held.relative)
            except Exception as error:  # unrenewed, it expires; the store's failure is told
                log.warning("could not release the lease on %s: %s", name, error)

    def _renew(self) -> None:
        while True:
            time.sleep(self.renew_every)
            with self._guard:
                held = list(self._held.items())
            for name, lease in held:
                with lease.writing:
                    self._renew_one(name, lease)

    def _renew_one(self, name: str, lease: _Held) -> None:
        with self._guard:
            if self._held.get(name) is not lease:
                return  # released meanwhile
        # A new version each time (an object's ETag is its content's hash): a waiter must see
        # it change. Tried even while the store fails: a lease left unrenewed is taken over.
        content = {**lease.content, "beat": int(lease.content.get("beat", 0)) + 1}
        try:
            etag = self._write(lease.relative, content, lease.etag)
        except Exception as error:  # the store is failing: the next beat tries again
            log.warning("could not renew the lease on %s: %s", name, error)
            return
        if etag is None:
            log.warning("the lease on %s was taken over; this host computes it too", name)
            with self._guard:
                self._held.pop(name, None)
            return
        lease.etag, lease.content = etag, content
