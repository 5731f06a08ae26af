"""Per-image pieces: sealed pack by pack, so a killed writer leaves nothing a later run trusts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from catdog.arrays import NpyWriter
from catdog.pieces import WORKING_PREFIX, PieceStore

REPO = Path(__file__).resolve().parents[1]

# Writes 40 rows in packs of 10, one pack every half second, saying when each is sealed.
SLOW_WRITER = """
import sys, time
import numpy as np
from pathlib import Path
from catdog.pieces import PieceStore

store = PieceStore(Path(sys.argv[1]))
with store.adding_rows((3,), np.float32, 40, "test", pack_rows=10) as packer:
    for start in range(0, 40, 5):
        packer.add([f"k{i}" for i in range(start, start + 5)],
                   np.arange(start * 3, start * 3 + 15, dtype=np.float32).reshape(5, 3))
        print(len(list(Path(sys.argv[1]).glob("*.json"))), flush=True)
        time.sleep(0.5)
"""


def rows_of(keys: list[str]) -> np.ndarray:
    return np.array([[3 * int(k[1:]) + j for j in range(3)] for k in keys], dtype=np.float32)


def test_a_killed_writer_leaves_only_sealed_packs_and_the_next_computes_the_rest(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "pieces"
    writer = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(folder)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None
    for line in writer.stdout:  # killed halfway through its third pack
        if int(line) == 2:
            time.sleep(0.7)
            break
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    writer.stdout.close()

    assert list(folder.glob(f"{WORKING_PREFIX}*")), "the pack being written is left behind"
    store = PieceStore(folder)
    located = store.locate()
    assert sorted(located) == sorted(f"k{i}" for i in range(20))  # two sealed packs, no more
    wanted = [f"k{i}" for i in range(40)]
    missing = [key for key in wanted if key not in located]
    assert missing == [f"k{i}" for i in range(20, 40)]

    with store.adding_rows((3,), np.float32, len(missing), "test", pack_rows=10) as packer:
        packer.add(missing, rows_of(missing))
    located = store.locate()
    with NpyWriter(tmp_path / "all.npy", (40, 3), np.float32, "test") as out:
        store.gather(wanted, out, located)
    np.testing.assert_array_equal(np.load(tmp_path / "all.npy"), rows_of(wanted))


def test_a_damaged_pack_is_dropped_and_its_pieces_recomputed(tmp_path: Path) -> None:
    store = PieceStore(tmp_path / "pieces")
    keys = [f"k{i}" for i in range(6)]
    with store.adding_rows((3,), np.float32, 6, "test", pack_rows=3) as packer:
        packer.add(keys, rows_of(keys))
    first = sorted((tmp_path / "pieces").glob("*.npy"))[0]
    damaged = bytearray(first.read_bytes())
    damaged[-1] ^= 0xFF
    first.write_bytes(bytes(damaged))

    located = store.locate()

    assert len(located) == 3
    assert not first.exists() and not first.with_suffix(".json").exists()


def test_a_failure_while_adding_removes_the_unsealed_pack_only(tmp_path: Path) -> None:
    store = PieceStore(tmp_path / "pieces")
    with (
        pytest.raises(RuntimeError, match="decoder"),
        store.adding_rows((3,), np.float32, 6, "test", pack_rows=4) as packer,
    ):
        packer.add(["a", "b", "c", "d", "e"], np.zeros((5, 3), np.float32))
        raise RuntimeError("decoder gave up")
    assert sorted(store.locate()) == ["a", "b", "c", "d"]
    assert not list((tmp_path / "pieces").glob(f"{WORKING_PREFIX}*"))


def test_json_pieces_round_trip_and_first_sealed_wins(tmp_path: Path) -> None:
    store = PieceStore.at(tmp_path, "validation", {"code": "x"})
    store.add_values([("a", None), ("b", "truncated or corrupt image: broken data stream")])
    store.add_values([("c", None)])
    assert store.values() == {
        "a": None,
        "b": "truncated or corrupt image: broken data stream",
        "c": None,
    }
    assert PieceStore.at(tmp_path, "validation", {"code": "y"}).values() == {}


def test_an_augmented_view_does_not_depend_on_its_batch() -> None:
    """Per-image seeds: image b's view is the same alone or after another image."""
    from catdog.features import view_seeds
    from catdog.layers import RandomFlipAndRotation

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    layer = RandomFlipAndRotation(0.2, seed=3)
    both = np.asarray(layer.call_seeded(images, view_seeds(["a", "b"], 2, 7)))
    alone = np.asarray(layer.call_seeded(images[1:], view_seeds(["b"], 2, 7)))
    np.testing.assert_allclose(both[1], alone[0], atol=1e-4)
    assert not np.allclose(both[1], images[1])  # it is an augmented view
    other_seed = np.asarray(layer.call_seeded(images[1:], view_seeds(["b"], 2, 8)))
    assert not np.allclose(other_seed[0], alone[0])


def test_an_image_changed_after_the_manifest_hashed_it_is_not_sealed(tmp_path: Path) -> None:
    from catdog.data.images import load_image
    from catdog.errors import ImageChangedError
    from catdog.hashing import sha256_file_uncached
    from tests.conftest import write_image

    path = write_image(tmp_path / "cat.jpg", 1)
    digest = sha256_file_uncached(path)
    assert load_image(path, 8, digest).shape == (8, 8, 3)
    write_image(path, 2)  # rewritten while the run goes on
    with pytest.raises(ImageChangedError, match="changed after this run's manifest read it"):
        load_image(path, 8, digest)


def test_the_manifest_reads_again_a_file_replaced_with_its_old_size_and_time(
    tmp_path: Path,
) -> None:
    """A copy that keeps size and modification time (`cp -p`, `rsync -a`) is still noticed."""
    from catdog.data.manifest import KnownImages, build_manifest
    from catdog.hashing import HashMemo
    from tests.conftest import make_dataset, write_image

    root = make_dataset(tmp_path / "photos", train=2, validation=2)
    for path in root.rglob("*.jpg"):  # settled: older than the manifest's two seconds
        os.utime(path, (time.time() - 60, time.time() - 60))
    memo = HashMemo(tmp_path / "memo.json")
    first = KnownImages(memo=memo)
    build_manifest(root, known=first)
    assert first.read == 8

    again = KnownImages(memo=memo, verdicts=dict.fromkeys(first_digests(root)))
    build_manifest(root, known=again)
    assert again.read == 0 and again.validated == 0

    target = root / "train" / "cats" / "cats.0.jpg"
    before = target.stat()
    replacement = write_image(tmp_path / "other.jpg", 77)
    replacement.write_bytes(replacement.read_bytes()[: before.st_size].ljust(before.st_size, b"\0"))
    os.replace(replacement, target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size
    last = KnownImages(memo=memo, verdicts=dict.fromkeys(first_digests(root)))
    build_manifest(root, known=last)
    assert last.read == 1


def first_digests(root: Path) -> list[str]:
    from catdog.hashing import sha256_file_uncached

    return [sha256_file_uncached(path) for path in root.rglob("*.jpg")]


def test_near_duplicates_found_incrementally_are_those_found_at_once() -> None:
    """Links an earlier run found, plus the new images compared with all: the same groups as
    comparing everything, also when some earlier images are gone."""
    from catdog.data import quality

    rng = np.random.default_rng(5)
    whole = rng.integers(0, 2**63, 400, dtype=np.uint64)
    near = whole[rng.integers(0, 400, 120)] ^ (
        np.uint64(1) << rng.integers(0, 64, 120).astype(np.uint64)
    )
    hashes = np.stack([np.concatenate([whole, near])] * 3, axis=1)  # 520 images, 3 scales
    keys = [f"k{i}" for i in range(len(hashes))]
    bits = quality.NEAR_DUPLICATE_BITS
    at_once = quality.near_duplicate_groups(hashes, bits)
    assert sum(len(group) for group in at_once) >= 120  # the near copies are found

    before = rng.permutation(len(keys))[:420]  # an earlier run saw 420 of them, and a gone one
    earlier_links, compared = quality.incremental_links(
        hashes[before], [keys[i] for i in before], bits, []
    )
    assert compared == 420
    note = {
        "compared": [keys[i] for i in before] + ["gone"],
        "links": [[keys[before[i]], keys[before[j]]] for i, j in earlier_links] + [["gone", "k1"]],
        "max_bits": bits,
    }
    links, compared = quality.incremental_links(hashes, keys, bits, [note])
    assert compared == 100
    assert quality.groups_of(len(keys), links) == at_once
