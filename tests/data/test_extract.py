"""Safe extraction of hostile and damaged archives, and finding the dataset inside."""

from __future__ import annotations

import contextlib
import io
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from catdog.data import extract as extract_module
from catdog.data.extract import (
    ExtractLimits,
    _copy_limited,
    extract_archive,
    find_dataset_root,
)
from catdog.errors import ArchiveError, DataError

Tree = Callable[[Path], list[str]]


def _assert_clean(tmp_path: Path, before: list[str], tree_of: Tree) -> None:
    """Nothing new anywhere under tmp_path: no half-extracted temp folder, no escaped file."""
    assert tree_of(tmp_path) == before


def _hostile_zip(archive: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in members:
            zf.writestr(info, data)
    return archive


def _symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


GOOD = [("data/train/cats/a.jpg", b"x" * 10), ("data/train/dogs/b.jpg", b"y" * 10)]


@pytest.mark.parametrize(
    ("member", "message"),
    [
        ("../escaped.txt", r"'\.\./escaped\.txt' contains '\.\.'"),
        ("data/../../escaped.txt", r"contains '\.\.'"),
        ("..\\..\\escaped.txt", r"contains '\.\.'"),
        ("/tmp/escaped.txt", r"'/tmp/escaped\.txt' has an absolute path"),
        ("C:/escaped.txt", r"'C:/escaped\.txt' has a drive letter"),
        ("C:escaped.txt", r"has a drive letter"),
    ],
)
def test_hostile_paths_are_refused_before_writing(
    workspace: tuple[Path, Path],
    tmp_path: Path,
    tree_of: Tree,
    monkeypatch: pytest.MonkeyPatch,
    member: str,
    message: str,
) -> None:
    archives, parent = workspace
    # The hostile member comes last: the check must cover all members before any is written.
    archive = _hostile_zip(archives / "evil.zip", [*GOOD, (zipfile.ZipInfo(member), b"pwned")])
    opened: list[Path] = []
    monkeypatch.setattr(
        extract_module, "atomic_directory", lambda dest: opened.append(dest) or pytest.fail()
    )
    before = tree_of(tmp_path)
    with pytest.raises(ArchiveError, match=message) as caught:
        extract_archive(archive, parent / "data")
    assert str(archive) in str(caught.value)
    assert opened == []
    _assert_clean(tmp_path, before, tree_of)


def test_symlink_entries_are_refused(
    workspace: tuple[Path, Path], tmp_path: Path, tree_of: Tree
) -> None:
    archives, parent = workspace
    archive = _hostile_zip(
        archives / "link.zip",
        [*GOOD, (_symlink_info("data/link"), b"../../../etc"), ("data/link/passwd", b"x")],
    )
    before = tree_of(tmp_path)
    with pytest.raises(ArchiveError, match=r"member 'data/link' is a symbolic link"):
        extract_archive(archive, parent / "data")
    _assert_clean(tmp_path, before, tree_of)


def test_special_files_and_encrypted_members_are_refused(workspace: tuple[Path, Path]) -> None:
    archives, parent = workspace
    fifo = zipfile.ZipInfo("data/fifo")
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    with pytest.raises(ArchiveError, match=r"'data/fifo' is a special file"):
        extract_archive(_hostile_zip(archives / "fifo.zip", [(fifo, b"")]), parent / "data")

    archive = _hostile_zip(archives / "enc.zip", [("data/secret.jpg", b"z" * 100)])
    raw = bytearray(archive.read_bytes())
    # Set the "encrypted" flag bit in the local and central headers.
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.index(signature) + flag_offset
        raw[at] |= 0x1
    archive.write_bytes(bytes(raw))
    with pytest.raises(ArchiveError, match=r"'data/secret\.jpg' is encrypted"):
        extract_archive(archive, parent / "data")


@pytest.mark.parametrize(
    "names",
    [
        ["data/a.jpg", "data/a.jpg"],
        ["data/a.jpg", "data\\a.jpg"],
        ["data/a", "data/a/b.jpg"],
        ["data/a/b.jpg", "data/a"],
        ["data/a/", "data/a"],
    ],
)
def test_conflicting_members_are_refused(workspace: tuple[Path, Path], names: list[str]) -> None:
    archives, parent = workspace
    with pytest.warns(UserWarning) if names[0] == names[1] else contextlib.nullcontext():
        archive = _hostile_zip(archives / "dup.zip", [(name, b"x") for name in names])
    with pytest.raises(ArchiveError, match=r"conflicts with member"):
        extract_archive(archive, parent / "data")
    assert not (parent / "data").exists()


def _zeros_zip(archive: Path, megabytes: int) -> Path:
    # Streamed in 1 MiB chunks, so the test never holds the whole bomb in memory.
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data/train/cats/a.jpg", b"x" * 10)
        with zf.open("data/bomb.bin", "w") as member:
            for _ in range(megabytes):
                member.write(chunk)
    return archive


def test_zip_bomb_ratio_is_refused(
    workspace: tuple[Path, Path], tmp_path: Path, tree_of: Tree
) -> None:
    archives, parent = workspace
    archive = _zeros_zip(archives / "bomb.zip", 50)
    before = tree_of(tmp_path)
    with pytest.raises(ArchiveError, match=r"'data/bomb\.bin' expands \d+x .*limit of 200x"):
        extract_archive(archive, parent / "data")
    _assert_clean(tmp_path, before, tree_of)


def test_total_size_limit(
    workspace: tuple[Path, Path],
    tmp_path: Path,
    tree_of: Tree,
    dataset_factory: Callable[..., Path],
    zipper: Callable[..., Path],
) -> None:
    archives, parent = workspace
    archive = zipper(dataset_factory(n=3), archives / "big.zip")
    bomb = _zeros_zip(archives / "bomb.zip", 3)
    before = tree_of(tmp_path)
    with pytest.raises(ArchiveError, match=r"big\.zip unpacks to more than 5000 bytes"):
        extract_archive(archive, parent / "data", ExtractLimits(max_total_bytes=5000))
    # A bomb under the ratio limit (raised for this archive) still hits the total size.
    with pytest.raises(ArchiveError, match=r"limit reached at member 'data/bomb\.bin'"):
        extract_archive(
            bomb,
            parent / "data",
            ExtractLimits(max_total_bytes=2 << 20, max_compression_ratio=10_000),
        )
    _assert_clean(tmp_path, before, tree_of)


def test_member_count_limit(workspace: tuple[Path, Path]) -> None:
    archives, parent = workspace
    archive = _hostile_zip(archives / "many.zip", [(f"data/{i}.txt", b"") for i in range(5)])
    with pytest.raises(ArchiveError, match=r"many\.zip has 5 members, more than the limit of 4"):
        extract_archive(archive, parent / "data", ExtractLimits(max_members=4))


def _patch_sizes(raw: bytearray, *, uncompressed: int, crc: int | None = None) -> None:
    """Rewrite the first member's declared uncompressed size (and CRC) in both headers."""
    local = raw.index(b"PK\x03\x04")
    central = raw.index(b"PK\x01\x02")
    for start, crc_at, size_at in ((local, 14, 22), (central, 16, 24)):
        struct.pack_into("<I", raw, start + size_at, uncompressed)
        if crc is not None:
            struct.pack_into("<I", raw, start + crc_at, crc)


def test_lying_size_header_never_writes_more_than_declared(
    workspace: tuple[Path, Path], tmp_path: Path, tree_of: Tree
) -> None:
    archives, parent = workspace
    payload = bytes(range(256)) * 400  # 100 KiB
    archive = _hostile_zip(archives / "liar.zip", [("data/a.bin", payload)])
    raw = bytearray(archive.read_bytes())
    _patch_sizes(raw, uncompressed=1000)
    archive.write_bytes(bytes(raw))
    before = tree_of(tmp_path)
    with pytest.raises(ArchiveError, match=r"member 'data/a\.bin' is corrupt: Bad CRC-32"):
        extract_archive(archive, parent / "data")
    _assert_clean(tmp_path, before, tree_of)

    # With a forged CRC the declared size still bounds what lands on disk.
    _patch_sizes(raw, uncompressed=1000, crc=zlib.crc32(payload[:1000]))
    archive.write_bytes(bytes(raw))
    dest = extract_archive(archive, parent / "data")
    assert (dest / "data/a.bin").stat().st_size == 1000


def test_copy_guard_stops_at_declared_size() -> None:
    target = io.BytesIO()
    with pytest.raises(ArchiveError, match=r"more bytes than its header declares \(10\)"):
        _copy_limited(io.BytesIO(b"a" * 11), target, 10, "x.zip: member 'a'")
    assert _copy_limited(io.BytesIO(b"a" * 10), io.BytesIO(), 10, "x.zip: member 'a'") == 10


def test_bad_crc_is_refused_and_cleaned_up(
    workspace: tuple[Path, Path], tmp_path: Path, tree_of: Tree
) -> None:
    archives, parent = workspace
    archive = archives / "crc.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("data/train/cats/a.jpg", b"A" * 1000)
        zf.writestr("data/train/cats/b.jpg", b"B" * 1000)
    raw = bytearray(archive.read_bytes())
    raw[raw.index(b"B" * 1000) + 500] = ord("C")  # damage the second member's data
    archive.write_bytes(bytes(raw))
    before = tree_of(tmp_path)
    with pytest.raises(ArchiveError, match=r"'data/train/cats/b\.jpg' is corrupt: Bad CRC-32"):
        extract_archive(archive, parent / "data")
    # The first member was already extracted; the whole temporary folder must be gone.
    _assert_clean(tmp_path, before, tree_of)


def test_truncated_zip(
    workspace: tuple[Path, Path],
    tmp_path: Path,
    tree_of: Tree,
    dataset_factory: Callable[..., Path],
    zipper: Callable[..., Path],
) -> None:
    archives, parent = workspace
    archive = zipper(dataset_factory(), archives / "cut.zip")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    before = tree_of(tmp_path)
    with pytest.raises(ArchiveError, match=r"cut\.zip is truncated or corrupt: "):
        extract_archive(archive, parent / "data")
    _assert_clean(tmp_path, before, tree_of)


def test_not_a_zip(workspace: tuple[Path, Path], tmp_path: Path, tree_of: Tree) -> None:
    archives, parent = workspace
    page = archives / "data.zip"
    page.write_bytes(b"<html><body>Quota exceeded</body></html>")
    empty = archives / "empty.zip"
    empty.write_bytes(b"")
    before = tree_of(tmp_path)
    with pytest.raises(
        ArchiveError, match=r"data\.zip is not a zip archive \(starts with b'<html>"
    ):
        extract_archive(page, parent / "data")
    with pytest.raises(ArchiveError, match=r"empty\.zip is empty"):
        extract_archive(empty, parent / "data")
    with pytest.raises(ArchiveError, match=r"missing\.zip does not exist"):
        extract_archive(archives / "missing.zip", parent / "data")
    _assert_clean(tmp_path, before, tree_of)


def test_zip_without_class_folders(workspace: tuple[Path, Path]) -> None:
    archives, parent = workspace
    archive = _hostile_zip(
        archives / "docs.zip", [("readme.txt", b"hello"), ("docs/a.txt", b"a"), ("b.jpg", b"")]
    )
    dest = extract_archive(archive, parent / "data")
    with pytest.raises(DataError, match=r"data has no class folders: expected train/ and vali"):
        find_dataset_root(dest)


def test_litter_is_skipped_and_nested_root_found(
    workspace: tuple[Path, Path],
    tree_of: Tree,
    dataset_factory: Callable[..., Path],
    zipper: Callable[..., Path],
) -> None:
    archives, parent = workspace
    root = dataset_factory(name="cats_and_dogs_filtered", n=2)
    (root / "vectorize.py").write_text("print('stray')\n")
    archive = zipper(root, archives / "official.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("__MACOSX/cats_and_dogs_filtered/train/cats/._cats.0.jpg", b"junk")
        zf.writestr("cats_and_dogs_filtered/train/cats/.DS_Store", b"junk")
        zf.writestr("cats_and_dogs_filtered/train/dogs/._dogs.0.jpg", b"junk")
        zf.writestr("cats_and_dogs_filtered/validation/Thumbs.db", b"junk")
    dest = extract_archive(archive, parent / "data")
    assert dest == parent / "data"
    files = tree_of(dest)
    assert not [f for f in files if "MACOSX" in f or "/._" in f or "DS_Store" in f or "Thumbs" in f]
    assert "cats_and_dogs_filtered/vectorize.py" in files
    assert len([f for f in files if f.endswith(".jpg")]) == 8
    assert sorted(p.name for p in parent.iterdir()) == ["already-here.txt", "data"]

    found_root, layout, classes = find_dataset_root(dest)
    assert found_root == dest / "cats_and_dogs_filtered"
    assert (layout, classes) == ("train_validation", ("cats", "dogs"))


def test_existing_destination_is_kept(workspace: tuple[Path, Path]) -> None:
    archives, parent = workspace
    archive = _hostile_zip(archives / "a.zip", GOOD)
    dest = extract_archive(archive, parent / "data")
    (dest / "marker").write_text("first run")
    assert extract_archive(archive, parent / "data") == dest
    assert (dest / "marker").read_text() == "first run"
    # An existing but empty folder does not count as a finished extraction.
    empty = parent / "empty"
    empty.mkdir()
    assert (extract_archive(archive, empty) / "data/train/cats/a.jpg").is_file()


# find_dataset_root on folders ------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("train_validation", "train_validation"),
        ("train_val", "train_validation"),
        ("train_validation_test", "train_validation_test"),
        ("single_root", "single_root"),
    ],
)
def test_layouts(dataset_factory: Callable[..., Path], layout: str, expected: str) -> None:
    root = dataset_factory(layout=layout, classes=("a", "b", "c"), n=1)
    assert find_dataset_root(root) == (root, expected, ("a", "b", "c"))
    # Also found one level down.
    assert find_dataset_root(root.parent) == (root, expected, ("a", "b", "c"))


def test_mismatched_class_folders(dataset_factory: Callable[..., Path]) -> None:
    root = dataset_factory(n=1)
    (root / "validation/dogs").rename(root / "validation/dog")
    with pytest.raises(DataError, match=r"validation does not have the same class folders .*"):
        find_dataset_root(root)
    with pytest.raises(DataError, match=r"missing \['dogs'\], extra \['dog'\]"):
        find_dataset_root(root)


def test_class_folder_without_images(dataset_factory: Callable[..., Path]) -> None:
    root = dataset_factory(n=1)
    for image in (root / "validation/dogs").iterdir():
        image.unlink()
    (root / "validation/dogs/notes.txt").write_text("todo")
    with pytest.raises(DataError, match=r"without any image files .*validation/dogs"):
        find_dataset_root(root)


def test_one_class_is_not_enough(dataset_factory: Callable[..., Path]) -> None:
    root = dataset_factory(classes=("cats",), n=1)
    with pytest.raises(DataError, match=r"only one class folder \(cats/\)"):
        find_dataset_root(root)
    flat = dataset_factory(name="flat", layout="single_root", classes=("cats",), n=1)
    with pytest.raises(DataError, match=r"has no class folders"):
        find_dataset_root(flat)


def test_half_a_split_layout(dataset_factory: Callable[..., Path]) -> None:
    root = dataset_factory(layout="train_validation_test", n=1)
    (root / "validation").rename(root / "holdout")
    with pytest.raises(DataError, match=r"has test/, train/ but needs both train/ and valid"):
        find_dataset_root(root)


def test_several_datasets_are_ambiguous(dataset_factory: Callable[..., Path]) -> None:
    first = dataset_factory(name="one", n=1)
    dataset_factory(name="two", n=1)
    with pytest.raises(DataError, match=r"holds several datasets \(one/, two/\)"):
        find_dataset_root(first.parent)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope does not exist"):
        find_dataset_root(tmp_path / "nope")
