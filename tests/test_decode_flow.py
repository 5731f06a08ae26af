"""Decoding interrupted (killed, or a disk that fills up): nothing half-written is ever trusted."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import textwrap
import time
from dataclasses import replace

import numpy as np
import pytest

from catdog.data.images import decode_split, open_split
from catdog.data.records import Manifest
from catdog.layout import Layout
from catdog.pieces import PieceStore
from catdog.prune import plan
from tests.conftest import flow_command, flow_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

# Dies by SIGKILL right after the first decoded pixels reach the disk (a pack of pieces).
KILL_DURING_DECODE = textwrap.dedent(
    """
    import os, signal
    from catdog import arrays

    write = arrays.NpyWriter.write

    def write_then_die(self, rows):
        write(self, rows)
        if self.path.name.startswith(".tmp-"):
            self._file.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    arrays.NpyWriter.write = write_then_die
    """
)


def _env(tmp_path, **extra: str) -> dict[str, str]:
    # The test's Prefect API: the runs start no server whose database the file limit would hit.
    return flow_env(tmp_path / "home", **extra)


def _limit_files_to(size: int):
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def test_a_killed_or_full_disk_decode_leaves_nothing_a_later_run_trusts(dataset_zip, tmp_path):
    artifacts = tmp_path / "artifacts"
    command = [*flow_command(dataset_zip, artifacts, epochs=1)]
    command[command.index("--image-size") + 1] = "200"  # 24 train images: 2.9 MB of arrays
    arrays_dir = artifacts / "03_splits/arrays"

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_DURING_DECODE)
    killed = subprocess.run(
        command, env=_env(tmp_path, PYTHONPATH=str(hook)), capture_output=True, timeout=600
    )
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in arrays_dir.iterdir() if not p.name.startswith(".")] == []
    leftovers = [p for p in arrays_dir.iterdir() if p.name.startswith(".")]
    (pixels,) = (artifacts / "pieces" / "pixels").iterdir()
    partial = list(pixels.iterdir())
    assert len(partial) == 1 and partial[0].name.startswith(".tmp-")  # no pack was sealed
    assert partial[0].stat().st_size > 0
    assert PieceStore(pixels).locate() == {}

    full = subprocess.run(
        command,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_limit_files_to(1_500_000),
    )
    assert full.returncode == 1, full.stdout + full.stderr  # the machine is at fault, not the input
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, full.stderr
    assert errors[0].startswith(
        "error: decode_images (pixels at 200x200): the disk filled up writing .tmp-"
    )
    assert "this file needs 5.3 MB" in errors[0]
    assert [p.name for p in arrays_dir.iterdir() if not p.name.startswith(".")] == []
    assert PieceStore(pixels).locate() == {}

    done = subprocess.run(command, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((artifacts / "summary.json").read_text())
    assert summary["tasks"]["decode_images[200]"] == "Completed"
    assert summary["stage_seconds"]["decode_images[200]"] > 0
    (decoded,) = [p for p in arrays_dir.iterdir() if not p.name.startswith(".")]
    split_dir = next(
        artifacts / d for d in summary["artifacts_used"] if d.startswith("03_splits/splits")
    )
    root = json.loads((split_dir / "record.json").read_text())["root"]
    split = replace(Manifest.load(split_dir / "split.json"), root=str(artifacts / root))
    images, labels = decode_split(split, "train", 200)
    rows, decoded_labels = open_split(decoded, "train", PieceStore(pixels))
    np.testing.assert_array_equal(rows[:], images)
    np.testing.assert_array_equal(decoded_labels, labels)
    # What the killed run left is a leftover that `cache prune` removes (once a day old, as a
    # run may still be writing it), never a cache entry.
    two_days_on = time.time() + 2 * 86400
    removed = [removal.path for removal in plan(Layout.at(artifacts), now=two_days_on).removals]
    assert set(leftovers) | {partial[0]} <= set(removed)
    assert summary["disk_bytes"]["decode"] == sum(
        p.stat().st_size for p in decoded.iterdir() if p.is_file()
    )
