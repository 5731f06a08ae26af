"""File hashes remembered by size and mtime; the code fingerprint that keys each stage."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from catdog.hashing import HashMemo, _module_digest, code_fingerprint

REPO = Path(__file__).resolve().parents[1]


def test_memo_rehashes_a_changed_file_and_persists(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"first")
    store = tmp_path / "memo.json"
    memo = HashMemo(store)
    assert memo.sha256(image) == hashlib.sha256(b"first").hexdigest()
    memo.save()

    image.write_bytes(b"second, longer")
    assert HashMemo(store).sha256(image) == hashlib.sha256(b"second, longer").hexdigest()


def test_two_memos_saving_one_store_keep_both_entries(tmp_path):
    """Two processes (or two hosts of a cluster) remember different files in one shared memo."""
    store = tmp_path / "file-hashes.json"
    first, second = HashMemo(store), HashMemo(store)  # both read it before either saves
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    first.sha256(tmp_path / "a")
    second.sha256(tmp_path / "b")
    first.save()
    second.save()
    entries = HashMemo(store)._entries
    assert {Path(key).name for key in entries} == {"a", "b"}


def test_a_memo_saved_twice_keeps_what_another_saved_in_between(tmp_path):
    """Saving again skips reading the store only while nobody else has written it."""
    store = tmp_path / "file-hashes.json"
    for name in "abc":
        (tmp_path / name).write_bytes(name.encode())
    first = HashMemo(store)
    first.sha256(tmp_path / "a")
    first.save()
    other = HashMemo(store)
    other.sha256(tmp_path / "b")
    other.save()
    first.sha256(tmp_path / "c")
    first.save()
    assert {Path(key).name for key in HashMemo(store)._entries} == {"a", "b", "c"}


def test_known_all_answers_as_known_does_for_each_path(tmp_path):
    """The manifest's bulk lookup: a remembered file as it was, a changed one, a new one and
    a missing one."""
    import time

    memo = HashMemo(tmp_path / "memo.json")
    for name in ("same", "changed"):
        path = tmp_path / name
        path.write_bytes(name.encode())
        memo.note(path, hashlib.sha256(path.read_bytes()).hexdigest(), path.stat())
    time.sleep(0.01)
    (tmp_path / "changed").write_bytes(b"changed again")
    (tmp_path / "new").write_bytes(b"new")
    paths = [str(tmp_path / name) for name in ("same", "changed", "new", "missing")]
    assert memo.known_all(paths) == [memo.known(path) for path in paths]
    assert memo.known_all(paths) == [hashlib.sha256(b"same").hexdigest(), None, None, None]


def test_memo_trusts_size_and_mtime_so_unchanged_files_are_not_read(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"original")
    store = tmp_path / "memo.json"
    memo = HashMemo(store)
    remembered = memo.sha256(image)
    memo.save()
    # Same size and mtime, different bytes: only a read could tell, and the memo does not read.
    stat = image.stat()
    image.write_bytes(b"ORIGINAL")
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert HashMemo(store).sha256(image) == remembered


def test_memo_keys_a_file_by_its_real_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.jpg").write_bytes(b"x")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    memo = HashMemo(tmp_path / "memo.json")
    memo.sha256(tmp_path / "link" / "a.jpg")
    memo.sha256(real / "a.jpg")
    memo.sha256(tmp_path / "real" / ".." / "real" / "a.jpg")
    memo.save()
    assert list(HashMemo(tmp_path / "memo.json")._entries) == [str(real.resolve() / "a.jpg")]


def test_code_fingerprint_follows_catdog_imports_transitively():
    _, imports = _module_digest("catdog.training")
    # `from catdog import models` names a module and is followed; `from catdog.config import
    # TrainConfig` names a class, so only catdog.config is.
    assert {"catdog.models", "catdog.config"} <= imports
    assert "catdog.config.TrainConfig" not in imports
    _, features_imports = _module_digest("catdog.features")
    assert "catdog.models" in features_imports  # imported inside a function
    assert code_fingerprint("catdog.training") != code_fingerprint("catdog.config")


def test_code_fingerprint_imports_nothing_heavy():
    code = (
        "import sys; from catdog.hashing import code_fingerprint; "
        "code_fingerprint('catdog.training', 'catdog.models', 'catdog.features'); "
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_code_digest_ignores_comments_and_layout_but_not_what_the_code_does():
    from catdog.hashing import code_digest

    original = "def f(x):\n    return x + 1\n"
    commented = "# why it adds one\ndef f(x):\n\n    return x + 1  # the next one\n"
    assert code_digest(original) == code_digest(commented)
    assert code_digest(original) != code_digest("def f(x):\n    return x + 2\n")
