"""Arrays on disk: numpy's own format, read a batch at a time, and a full disk stops cleanly."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from catdog.arrays import NpyRows, NpyWriter, require_space
from catdog.data.images import DecodedOnDemand, decode_split, decode_splits_to, open_split
from catdog.data.manifest import build_manifest
from catdog.data.split import split_manifest
from catdog.errors import DiskSpaceError
from catdog.io import human_bytes
from catdog.pieces import PieceStore
from tests.conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def _written(path: Path, array: np.ndarray, chunk: int, leading: int = 1) -> Path:
    with NpyWriter(path, array.shape, array.dtype, "test", leading=leading) as writer:
        rows = array.reshape(-1, *array.shape[leading:])
        for start in range(0, len(rows), chunk):
            writer.write(rows[start : start + chunk])
    return path


@pytest.mark.parametrize(
    ("shape", "dtype", "leading"),
    [((7, 5, 4, 3), np.uint8, 1), ((3, 6, 10), np.float32, 2), ((9,), np.int32, 1)],
)
def test_written_in_chunks_the_file_is_what_np_save_writes(tmp_path, shape, dtype, leading):
    array = np.random.default_rng(1).integers(0, 250, shape).astype(dtype)
    np.save(tmp_path / "saved.npy", array)
    _written(tmp_path / "chunked.npy", array, chunk=2, leading=leading)
    assert (tmp_path / "chunked.npy").read_bytes() == (tmp_path / "saved.npy").read_bytes()


def test_rows_read_from_disk_match_the_array(tmp_path):
    array = np.random.default_rng(2).integers(0, 255, (11, 4, 4, 3)).astype(np.uint8)
    np.save(tmp_path / "a.npy", array)
    rows = NpyRows(tmp_path / "a.npy")
    assert rows.shape == array.shape and len(rows) == 11 and rows.dtype == np.uint8
    np.testing.assert_array_equal(rows[3], array[3])
    np.testing.assert_array_equal(rows[2:9], array[2:9])
    np.testing.assert_array_equal(rows[1:10:3], array[1:10:3])
    np.testing.assert_array_equal(rows[np.array([9, 0, 9, -1])], array[[9, 0, 9, -1]])
    np.testing.assert_array_equal(rows[20:], array[20:])
    np.testing.assert_array_equal(rows.load(), array)
    with pytest.raises(IndexError, match="out of range"):
        rows[np.array([11])]


def test_leading_axes_are_flattened_into_rows(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # (views, n, dim)
    np.save(tmp_path / "f.npy", array)
    rows = NpyRows(tmp_path / "f.npy", leading=2)
    assert rows.shape == (6, 4)
    np.testing.assert_array_equal(rows[np.array([1 * 3 + 2])], array[1, 2][None])


def test_a_truncated_file_is_an_error_not_zeros(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 100), np.uint8))
    path = tmp_path / "a.npy"
    path.write_bytes(path.read_bytes()[:-150])
    with pytest.raises(OSError, match="damaged"):
        NpyRows(path)


def test_a_writer_closed_before_every_row_is_written_raises(tmp_path):
    writer = NpyWriter(tmp_path / "a.npy", (4, 2), np.uint8, "test")
    writer.write(np.zeros((3, 2), np.uint8))
    with pytest.raises(ValueError, match="3 of 4 rows written"):
        writer.close()
    with (
        pytest.raises(ValueError, match="do not fit"),
        NpyWriter(tmp_path / "b.npy", (4, 2), np.uint8, "test") as writer,
    ):
        writer.write(np.zeros((5, 2)))


@pytest.fixture
def split(tmp_path):
    root = make_dataset(tmp_path / "data", train=9, validation=6)
    return split_manifest(build_manifest(root), seed=3)


def test_decoding_to_disk_gives_the_in_memory_arrays(split, tmp_path):
    out = tmp_path / "arrays"
    out.mkdir()
    pixels = PieceStore(tmp_path / "pixels")
    decoded = decode_splits_to(split, 24, out, pixels, chunk=4)
    assert decoded.reuse.to_json() == {"computed": len(split.images), "reused": 0}
    for name in ("train", "validation", "test"):
        images, labels = decode_split(split, name, 24)
        rows, decoded_labels = open_split(out, name, pixels)
        np.testing.assert_array_equal(rows[:], images)
        np.testing.assert_array_equal(rows[np.array([1, 0])], images[[1, 0]])
        np.testing.assert_array_equal(decoded_labels, labels)
    np.save(tmp_path / "x.npy", decode_split(split, "test", 24)[0])
    assert (out / "test_x.npy").read_bytes() == (tmp_path / "x.npy").read_bytes()
    (tmp_path / "again").mkdir()
    again = decode_splits_to(split, 24, tmp_path / "again", pixels)
    assert again.reuse.to_json() == {"computed": 0, "reused": len(split.images)}


def test_images_decoded_on_demand_match_the_decoded_split(split):
    images, _ = decode_split(split, "validation", 20)
    lazy = DecodedOnDemand(split.paths(split.in_split("validation")), 20)
    assert lazy.shape == images.shape
    np.testing.assert_array_equal(lazy[1:3], images[1:3])
    np.testing.assert_array_equal(lazy[np.array([2, 0])], images[[2, 0]])
    np.testing.assert_array_equal(lazy[1], images[1])


def test_a_stage_that_cannot_fit_is_refused_before_it_starts(tmp_path):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(DiskSpaceError) as error:
        require_space(tmp_path, free + 10**9, "decode_images")
    message = str(error.value)
    assert message.startswith("decode_images: not enough disk space in")
    assert "GB" in message and "--artifacts" in message
    require_space(tmp_path, 1000, "decode_images")  # no error


def test_a_disk_that_fills_up_during_decoding_stops_with_one_clear_error(split, tmp_path):
    # A process whose files may not grow past 20 KB: writing fails as on a full disk.
    out = tmp_path / "arrays"
    out.mkdir()
    size = len([entry for entry in split.images if entry.split]) * 64 * 64 * 3  # one pack
    manifest = tmp_path / "split.json"
    split.save(manifest)
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from catdog.data.records import Manifest
        from catdog.data.images import decode_splits_to
        from catdog.errors import DiskSpaceError
        from catdog.pieces import PieceStore
        try:
            decode_splits_to(
                Manifest.load(Path({str(manifest)!r})), 64, Path({str(out)!r}),
                PieceStore(Path({str(out)!r}) / "pixels"),
            )
        except DiskSpaceError as error:
            print(error)
            raise SystemExit(3)
        """
    )

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    message = done.stdout.strip()
    assert message.startswith("decode_images (pixels at 64x64): the disk filled up")
    assert ".tmp-" in message and f"this file needs {human_bytes(size)}" in message
