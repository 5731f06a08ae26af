"""The cache's file locks: a lock file caught half-written is held, not an error."""

from __future__ import annotations

from tasks.caching import CrashSafeLockManager


def test_a_lock_file_read_before_its_holder_is_written_counts_as_held(tmp_path):
    locks = CrashSafeLockManager(lock_files_directory=tmp_path)
    # What a second run sees between Prefect's creating the lock file and writing into it.
    (tmp_path / "decode-key.lock").touch()
    (tmp_path / "decode-key.lock.owner").write_text("elsewhere:1")
    assert locks.is_locked("decode-key")
    assert not locks.acquire_lock("decode-key", holder="second run", acquire_timeout=0.3)

    (tmp_path / "decode-key.lock").unlink()
    assert locks.acquire_lock("decode-key", holder="second run", acquire_timeout=0.3)
    assert locks.is_lock_holder("decode-key", "second run")
    locks.release_lock("decode-key", "second run")
    assert not locks.is_locked("decode-key")


def test_a_lock_from_another_host_expires_only_when_its_heartbeat_stops(tmp_path, monkeypatch):
    import os
    import time

    from tasks.caching import HOLD_TIMEOUT_ENV

    monkeypatch.setenv(HOLD_TIMEOUT_ENV, "60")
    locks = CrashSafeLockManager(lock_files_directory=tmp_path)
    assert locks.acquire_lock("train-key", holder="a worker elsewhere")
    owner = tmp_path / "train-key.lock.owner"
    owner.write_text("another-host:4242")  # a pid this host cannot check
    other = CrashSafeLockManager(lock_files_directory=tmp_path)
    assert other.is_locked("train-key")  # fresh heartbeat: held

    stale = time.time() - 61
    os.utime(owner, (stale, stale))
    assert not other.is_locked("train-key")  # no heartbeat for longer than the hold timeout
    assert not owner.exists() and not (tmp_path / "train-key.lock").exists()


def test_the_holder_heartbeat_keeps_its_lock_fresh(tmp_path, monkeypatch):
    import os
    import time

    from tasks import caching

    monkeypatch.setattr(caching, "HEARTBEAT", caching._Heartbeat(interval=0.05))
    locks = CrashSafeLockManager(lock_files_directory=tmp_path)
    assert locks.acquire_lock("train-key", holder="this run")
    owner = tmp_path / "train-key.lock.owner"
    long_ago = time.time() - 3600
    os.utime(owner, (long_ago, long_ago))
    deadline = time.monotonic() + 10
    while owner.stat().st_mtime < time.time() - 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert owner.stat().st_mtime > time.time() - 60
    locks.release_lock("train-key", "this run")
    assert not owner.exists()


def test_a_lock_of_a_killed_process_nobody_reaped_is_released(tmp_path):
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        stat = Path(f"/proc/{child.pid}/stat")
        while stat.read_text().rpartition(")")[2].split()[0] != "Z":  # a zombie now
            assert time.monotonic() < deadline
        locks = CrashSafeLockManager(lock_files_directory=tmp_path)
        assert locks.acquire_lock("train-key", holder="killed")
        (tmp_path / "train-key.lock.owner").write_text(f"{socket.gethostname()}:{child.pid}")
        assert not CrashSafeLockManager(lock_files_directory=tmp_path).is_locked("train-key")
    finally:
        child.wait()
