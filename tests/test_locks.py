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
