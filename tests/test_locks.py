"""The cache's file locks (Prefect's public LockManager protocol): held while their process
lives or, from another host, while its heartbeat goes on; never left behind by a crash."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from prefect.locking.protocol import LockManager

from tasks import locks
from tasks.locks import HOLD_TIMEOUT_ENV, ArtifactsLockManager, Heartbeat


def _claim(path: Path, process: str, holder: str = "someone") -> None:
    path.write_text(json.dumps({"holder": holder, "process": process, "expires": None}))


def test_it_is_a_prefect_lock_manager_and_locks_exclusively(tmp_path):
    manager = ArtifactsLockManager(tmp_path)
    assert isinstance(manager, LockManager)
    assert manager.acquire_lock("decode-key", holder="first")
    assert manager.acquire_lock("decode-key", holder="first")  # the holder again: still its
    assert not manager.acquire_lock("decode-key", holder="second", acquire_timeout=0.3)
    assert manager.is_locked("decode-key") and manager.is_lock_holder("decode-key", "first")
    assert not manager.wait_for_lock("decode-key", timeout=0.2)
    manager.release_lock("decode-key", "first")
    assert not manager.is_locked("decode-key") and manager.wait_for_lock("decode-key", 0)
    assert manager.acquire_lock("decode-key", holder="second", acquire_timeout=0)


def test_a_lock_file_naming_no_holder_is_held_for_a_minute_then_abandoned(tmp_path):
    manager = ArtifactsLockManager(tmp_path)
    lock = tmp_path / "decode-key.lock"
    lock.touch()  # not one this manager wrote: it writes a lock whole, holder and all
    assert manager.is_locked("decode-key")
    assert not manager.acquire_lock("decode-key", holder="second run", acquire_timeout=0.3)
    long_ago = time.time() - 61
    os.utime(lock, (long_ago, long_ago))
    assert manager.acquire_lock("decode-key", holder="second run", acquire_timeout=0)
    assert not list(tmp_path.glob(".decode-key.lock.*"))  # no drafts left beside the locks


def test_a_lock_whose_pid_now_belongs_to_another_process_is_released(tmp_path):
    manager = ArtifactsLockManager(tmp_path)
    host, pid, started = locks.this_process().split(":")
    # This very pid, but started at another time: the process that took the lock is gone.
    _claim(tmp_path / "train-key.lock", f"{host}:{pid}:{int(started) - 1}")
    assert not manager.is_locked("train-key")
    _claim(tmp_path / "train-key.lock", f"{host}:{pid}:{started}")
    assert manager.is_locked("train-key")


def test_a_lock_from_another_host_expires_only_when_its_heartbeat_stops(tmp_path, monkeypatch):
    monkeypatch.setenv(HOLD_TIMEOUT_ENV, "60")
    manager = ArtifactsLockManager(tmp_path)
    lock = tmp_path / "train-key.lock"
    _claim(lock, "another-host:4242")  # a pid this host cannot check
    assert manager.is_locked("train-key")  # fresh heartbeat: held
    stale = time.time() - 61
    os.utime(lock, (stale, stale))
    assert not manager.is_locked("train-key")  # no heartbeat for longer than the hold timeout
    assert not lock.exists()
    assert manager.acquire_lock("train-key", holder="this run", acquire_timeout=0)


def test_the_holder_heartbeat_keeps_its_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "HEARTBEAT", Heartbeat(interval=0.05))
    manager = ArtifactsLockManager(tmp_path)
    assert manager.acquire_lock("train-key", holder="this run")
    lock = tmp_path / "train-key.lock"
    long_ago = time.time() - 3600
    os.utime(lock, (long_ago, long_ago))
    deadline = time.monotonic() + 10
    while lock.stat().st_mtime < time.time() - 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.stat().st_mtime > time.time() - 60
    manager.release_lock("train-key", "this run")
    assert not lock.exists()


def test_a_lock_of_a_killed_process_nobody_reaped_is_released(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        stat = Path(f"/proc/{child.pid}/stat")
        while stat.read_text().rpartition(")")[2].split()[0] != "Z":  # a zombie now
            assert time.monotonic() < deadline
        _claim(tmp_path / "train-key.lock", f"{socket.gethostname()}:{child.pid}")
        manager = ArtifactsLockManager(tmp_path)
        assert not manager.is_locked("train-key")
        assert manager.acquire_lock("train-key", holder="next run", acquire_timeout=0)
    finally:
        child.wait()


def test_an_expired_hold_is_free_and_release_checks_the_holder(tmp_path):
    manager = ArtifactsLockManager(tmp_path)
    assert manager.acquire_lock("split-key", holder="brief", hold_timeout=0.2)
    try:
        manager.release_lock("split-key", "somebody else")
    except ValueError as error:
        assert "split-key" in str(error)
    else:
        raise AssertionError("released a lock its caller does not hold")
    time.sleep(0.3)
    assert not manager.is_locked("split-key")
