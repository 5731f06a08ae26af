"""Free disk space: remove stage outputs and Prefect cache entries that no recent run uses.

Each finished run leaves `05_reports/runs/<stamp>-<id>/summary.json` whose `artifacts_used`
lists every stage output folder it read or wrote. Pruning keeps the folders named there by the
last N runs, removes every other stage folder (`<stage>-<hash>` under `catdog.layout.STAGE_DIRS`)
with the Prefect cache-key and result files of the same key, and clears leftovers of crashed
runs (`.<name>.tmp-*`, `.<name>.old-*` and `.partial` folders) once they are a day old.
Per-image pieces (`pieces/<kind>/<version>`, see catdog.pieces) go when no kept stage output
names them: a version no kept run used was made by other settings or older code.

Production keeps its current model and exports, the training folder it came from, and the
archives of the last N production models (what `registry rollback` can go back to); archives of
older ones (`production/models/NNNN-<model>.*`) go. Nothing is pruned while another run on the
folder is in progress (its marker in `.prefect/running/` names a live process).

With an object store (`--artifacts s3://...`) the store's run summaries decide, and the same
rules hold in the store and in this machine's copy of it. A stage output leaves the store record
first, then its pieces, so that no host fetches half of one. Runs in progress on other hosts
cannot be seen from here: what they write after the newest finished run stays, but an older
output they reuse may go under them, so only `cache prune` prunes the store; a run's own
pruning (`--keep-runs`) prunes this machine's copy. Working folders of lost hosts in the store
(a training's checkpoints, `.partial`) and the leases of entries they were computing
(`.prefect/locks/*.lease`) go once nothing in them has changed for a day.

Never touched: production's current files, run reports and their `summary.json`, files whose
names are not stage keys, anything outside the artifacts folder (symbolic links are never
followed), and anything modified after the newest finished run. A removed stage is simply
recomputed by the next run that needs it. No Prefect or TensorFlow import here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from catdog.config import RUN
from catdog.errors import CatdogError
from catdog.io import atomic_write_json, exclusive_lock, human_bytes
from catdog.layout import (
    PRODUCTION_DIR,
    RECORD_FILE,
    RUNS_DIR,
    STAGE_DIRS,
    SUMMARY_FILE,
    Layout,
    size_on_disk,
)
from catdog.leases import STORE_LEASES
from catdog.mirror import pull_production, pull_run_summaries
from catdog.pieces import INDEX_SUFFIX, ROWS_SUFFIX, WORKING_PREFIX
from catdog.processes import runs_in_progress
from catdog.registry import RegistryError
from catdog.registry import read as read_registry
from catdog.store import ObjectStore, StoreConflict, StoredObject

DEFAULT_KEEP = RUN.keep_runs
LEFTOVER_AGE_SECONDS = 24 * 3600.0
USED = "artifacts_used"

KEY = re.compile(rf"^(?:{'|'.join(map(re.escape, STAGE_DIRS))})-[0-9a-f]{{8,64}}$")
LEFTOVER = re.compile(r"^(?:\..+\.(?:tmp|old)-[0-9a-f]+|\..+\.partial|\.partial)$")
# An archived production model's files: NNNN-<model>.keras, .keras.*.json, .export/
ARCHIVE = re.compile(r"^(\d{4}-[A-Za-z0-9_.-]+?)\.(?:keras(?:\..+)?|export)$")
NEVER = (PRODUCTION_DIR, RUNS_DIR)  # relative to the root; never listed, never entered
# In a store, the object whose presence makes the rest of a folder trusted, by kind of removal.
TRUSTED_BY = {"stage": f"/{RECORD_FILE}", "pieces": INDEX_SUFFIX}

log = logging.getLogger(__name__)


class PruneError(CatdogError):
    """The folder is not a catdog artifacts folder, or its runs do not say what they use."""


@dataclass(frozen=True)
class Removal:
    """One thing pruning removes (or would remove)."""

    path: Path  # in the store: where this machine's copy of it would be
    # "stage", "cache", "pieces", "leftover" or "archive" (an earlier production model)
    kind: str
    size: int  # bytes
    # In the store: its objects, in batches removed one after the other.
    stored: tuple[tuple[str, ...], ...] = ()


@dataclass
class PruneReport:
    """What a prune kept, removed and skipped."""

    root: Path
    kept_runs: list[str]
    location: str = ""  # the store's URL (default: the folder)
    removals: list[Removal] = field(default_factory=list)
    skipped_recent: list[Path] = field(default_factory=list)
    dry_run: bool = False
    busy: list[str] = field(default_factory=list)  # other runs in progress: nothing pruned

    @property
    def freed_bytes(self) -> int:
        return sum(removal.size for removal in self.removals)

    def count(self, kind: str) -> int:
        return sum(1 for removal in self.removals if removal.kind == kind)

    def render(self, verbose: bool = True) -> str:
        """A short human-readable account, one removed path a line when `verbose`."""
        verb = "would remove" if self.dry_run else "removed"
        if self.busy:
            return (
                f"artifacts: {self.location or self.root}\nnothing removed: run(s) "
                f"{', '.join(self.busy)} in "
                "progress on this folder may still need any of it; prune after they end"
            )
        lines = [
            f"artifacts: {self.location or self.root}",
            f"keeping what the last {len(self.kept_runs)} run(s) use: {', '.join(self.kept_runs)}",
        ]
        if verbose:
            for removal in self.removals:
                lines.append(f"  {verb} {self._rel(removal)}  ({human_bytes(removal.size)})")
        for path in self.skipped_recent:
            where = path.relative_to(self.root).as_posix()
            lines.append(f"  kept {where}: newer than the last finished run")
        lines.append(
            f"{verb} {self.count('stage')} stage folder(s), {self.count('cache')} cache file(s), "
            f"{self.count('pieces')} piece folder(s), {self.count('leftover')} leftover(s), "
            f"{self.count('archive')} archived "
            f"production file(s): {len(self.removals)} item(s), "
            f"{human_bytes(self.freed_bytes)} {'would be ' if self.dry_run else ''}freed"
        )
        return "\n".join(lines)

    def _rel(self, removal: Removal) -> str:
        relative = removal.path.relative_to(self.root).as_posix()
        if not self.location:
            return relative
        return f"{self.location}/{relative}" if removal.stored else f"(this machine) {relative}"


def check_artifacts(root: str | os.PathLike[str]) -> Layout:
    """The layout of `root`, or PruneError unless it looks like a catdog artifacts folder.

    Args:
        root: the folder given as `--artifacts`.

    Raises:
        PruneError: the folder is missing, holds none of the stage folders and no `.prefect/`,
            or has no finished run (whose summary says what must be kept).
    """
    layout = Layout.at(root)
    if layout.store is not None:
        # The store's runs decide: their summaries (small, never changed) come down first.
        pull_run_summaries(layout)
        pull_production(layout)
        if not _run_summaries(layout):
            raise PruneError(
                f"--artifacts {root}: no finished run in the store ({RUNS_DIR}/*/"
                f"{SUMMARY_FILE}), so nothing tells which outputs are in use; nothing removed"
            )
        return layout
    if not layout.root.is_dir():
        raise PruneError(f"--artifacts {root}: no such folder")
    tops = {PurePosixPath(folder).parts[0] for folder in STAGE_DIRS.values()}
    markers = [name for name in sorted(tops) if (layout.root / name).is_dir()]
    if layout.prefect_dir.is_dir():
        markers.append(".prefect")
    if not markers or not layout.runs_dir.is_dir():
        raise PruneError(
            f"--artifacts {root}: does not look like a catdog artifacts folder "
            f"(expected {RUNS_DIR}/ and stage folders such as 01_raw/ or .prefect/); "
            "nothing removed"
        )
    if not _run_summaries(layout):
        raise PruneError(
            f"--artifacts {root}: no finished run ({RUNS_DIR}/*/{SUMMARY_FILE}), so nothing "
            "tells which outputs are in use; nothing removed"
        )
    return layout


def _run_summaries(layout: Layout) -> list[Path]:
    """Every finished run's summary, oldest first (run folders are named `<UTC stamp>-<id>`)."""
    if not layout.runs_dir.is_dir():
        return []
    return sorted(
        (run / SUMMARY_FILE for run in layout.runs_dir.iterdir() if (run / SUMMARY_FILE).is_file()),
        key=lambda summary: summary.parent.name,
    )


def used_keys(summaries: Iterable[Path]) -> set[str]:
    """The stage keys (folder names) that these runs' summaries list in `artifacts_used`.

    Raises:
        PruneError: a summary cannot be read or has no `artifacts_used` list.
    """
    keys: set[str] = set()
    for summary in summaries:
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise PruneError(f"{summary}: cannot read it ({error}); nothing removed") from error
        used = data.get(USED) if isinstance(data, dict) else None
        if not isinstance(used, list):
            raise PruneError(
                f"{summary}: no {USED!r} list (not one catdog wrote), so what this run "
                "uses is unknown; nothing removed. Run the flow again, or lower --keep."
            )
        for entry in used:
            keys.update(part for part in PurePosixPath(str(entry)).parts if KEY.match(part))
    return keys


def _production_key(layout: Layout) -> set[str]:
    """The stage folder production's model was copied from, kept for its lineage."""
    try:
        production = read_registry(layout).production
    except RegistryError:
        return set()
    source = production.source if production else ""
    return {part for part in Path(source).parts if KEY.match(part)}


def _inside(layout: Layout, path: Path) -> bool:
    """True when `path` is a real (not linked) entry inside the artifacts folder."""
    if path.is_symlink():
        return False
    try:
        path.resolve().relative_to(layout.root)
    except ValueError:
        return False
    relative = path.resolve().relative_to(layout.root).as_posix()
    return not any(relative == never or relative.startswith(never + "/") for never in NEVER)


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(child for child in folder.iterdir() if not child.is_symlink())
    except OSError:
        return []


def _stage_bases(layout: Layout) -> list[Path]:
    bases = dict.fromkeys(layout.root / folder for folder in STAGE_DIRS.values())
    return [base for base in bases if base.is_dir() and _inside(layout, base)]


def _entries(layout: Layout) -> Iterator[Path]:
    """Every entry one or two levels below a stage base (`<base>/x`, `<base>/<name>/x`)."""
    seen: set[Path] = set()
    for base in _stage_bases(layout):
        for child in _children(base):
            candidates = [child]
            nested = not child.name.startswith(".") and not KEY.match(child.name)
            if nested and child.is_dir() and _inside(layout, child):
                candidates += _children(child)  # per-model sub-folders: 04_models/<model>/
            for path in candidates:
                if path not in seen and _inside(layout, path):
                    seen.add(path)
                    yield path


def stage_folders(layout: Layout) -> list[Path]:
    """Every `<stage>-<hash>` output folder in the artifacts folder."""
    return [path for path in _entries(layout) if path.is_dir() and KEY.match(path.name)]


def leftovers(layout: Layout) -> list[Path]:
    """Working folders of crashed or interrupted runs: `.<name>.tmp-*`, `.old-*`, `.partial`."""
    return [path for path in _entries(layout) if LEFTOVER.match(path.name)]


def cache_files(layout: Layout) -> list[Path]:
    """Prefect's cache-key and result files named by a stage key."""
    found = []
    for folder in (layout.cache_keys_dir, layout.results_dir):
        found += [p for p in _children(folder) if p.is_file() and KEY.match(p.name)]
    return found


def _piece_versions(layout: Layout) -> list[Path]:
    """Every `<kind>/<version>` folder of per-image pieces (see catdog.pieces)."""
    root = layout.pieces_dir
    if not root.is_dir() or not _inside(layout, root):
        return []
    return [v for kind in _children(root) if kind.is_dir() for v in _children(kind) if v.is_dir()]


def unused_pieces(layout: Layout, kept: Iterable[Path]) -> list[Path]:
    """The piece folders that no kept stage output's record names as its pieces."""
    used: set[str] = set()
    for folder in kept:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            used.update(json.loads((folder / RECORD_FILE).read_text()).get("pieces", []))
    return [path for path in _piece_versions(layout) if layout.relative(path) not in used]


def piece_leftovers(layout: Layout) -> list[Path]:
    """Packs a crashed run was writing, or had written but not indexed: never read."""
    return [
        path
        for version in _piece_versions(layout)
        for path in _children(version)
        if path.name.startswith(WORKING_PREFIX)
        or (path.suffix == ROWS_SUFFIX and not path.with_suffix(INDEX_SUFFIX).exists())
    ]


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir():
        for dirpath, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                with contextlib.suppress(OSError):
                    newest = max(newest, (Path(dirpath) / name).lstat().st_mtime)
    return newest


def _kept_archives(layout: Layout, keep: int) -> set[str]:
    """The archive names (`NNNN-<model>`) of the last `keep` production models: those
    `registry rollback` can reach in fewer than `keep` steps (empty: keep every archive)."""
    try:
        registry = read_registry(layout)
    except RegistryError:
        return set()  # a registry pruning cannot read: keep every archive
    history = registry.history
    entry = registry.production.entry if registry.production else None
    kept: set[str] = set()
    while entry is not None and len(kept) < keep:
        archive = str(history[entry].get("archive") or "")
        kept.add(PurePosixPath(archive).name.removesuffix(".keras"))
        entry = history[entry].get("replaced")
    return kept


def _old_archive(name: str, kept: set[str]) -> bool:
    match = ARCHIVE.match(name)
    return bool(kept and match and match[1] not in kept)


def production_archives(layout: Layout, keep: int) -> list[Path]:
    """Archived production models (and their exports and facts) older than the last `keep`
    production models: those `registry rollback` could only reach by `keep` or more steps."""
    kept = _kept_archives(layout, keep)
    return [
        path
        for path in _children(layout.production_dir / "models")
        if _old_archive(path.name, kept)
    ]


def _below_a_base(parts: list[str], index: int, bases: set[str]) -> bool:
    """Whether name part `index` lies in a stage base, or in a model's folder of one."""
    return any("/".join(parts[:cut]) in bases for cut in (index, index - 1) if cut > 0)


def _stored_stage_folder(parts: list[str], bases: set[str]) -> str | None:
    """The `<base>/[<name>/]<stage>-<hash>` folder that a stored object's name is under."""
    for index, part in enumerate(parts[:-1]):
        if KEY.match(part):
            return "/".join(parts[: index + 1]) if _below_a_base(parts, index, bases) else None
    return None


def _store_plan(layout: Layout, keys: set[str], keep: int, report: PruneReport, now: float) -> None:
    """Add what goes from the store to `report`: the rules of `plan`, over its objects, in the
    order they go (every stage record before any piece it names; a pack's index before it)."""
    store = layout.store
    assert store is not None
    objects = store.listing()
    newest_run = max(
        (
            found.modified
            for name, found in objects.items()
            if name.startswith(f"{RUNS_DIR}/") and name.endswith(f"/{SUMMARY_FILE}")
        ),
        default=0.0,
    )

    def recent(names: list[str]) -> bool:
        # A time the store did not give counts as recent: nothing goes on a guess.
        times = [objects[name].modified for name in names]
        return not newest_run or any(not time or time >= newest_run for time in times)

    groups = _stored_groups(layout, objects, keep)
    staying = [
        folder
        for (kind, folder), names in groups.items()
        if kind == "stage" and (folder.rsplit("/", 1)[1] in keys or recent(names))
    ]
    used_pieces = _pieces_named(store, staying)
    for (kind, folder), names in sorted(groups.items(), key=_removal_order):
        if kind == "stage" and folder in staying:
            continue
        if kind == "pieces" and (used_pieces is None or folder in used_pieces):
            continue
        if kind == "pieces" and recent(names):
            report.skipped_recent.append(layout.root / folder)
            continue
        if kind == "leftover" and not all(
            objects[name].modified and now - objects[name].modified > LEFTOVER_AGE_SECONDS
            for name in names
        ):
            continue
        trusted_by = TRUSTED_BY.get(kind)
        first = [name for name in names if trusted_by and name.endswith(trusted_by)]
        rest = [name for name in names if name not in first]
        size = sum(objects[name].size for name in names)
        batches = tuple(batch for batch in (tuple(first), tuple(rest)) if batch)
        report.removals.append(Removal(layout.root / folder, kind, size, batches))
    report.skipped_recent += [
        layout.root / folder for folder in staying if folder.rsplit("/", 1)[1] not in keys
    ]


def _removal_order(group: tuple[tuple[str, str], list[str]]) -> tuple[int, str]:
    """Stage folders first (their records name the pieces), then pieces, then archives and
    leftovers."""
    (kind, folder), _names = group
    return ("stage", "pieces", "archive", "leftover").index(kind), folder


def _stored_groups(
    layout: Layout, objects: dict[str, StoredObject], keep: int
) -> dict[tuple[str, str], list[str]]:
    """The store's objects that pruning may remove, by (kind, folder): stage folders, piece
    folders, archived production models numbered below the oldest one kept (an archive
    another host made after the registry was read is newer than any of those), and leftovers
    (working folders and leases of hosts that were lost), whatever their age."""
    bases = set(STAGE_DIRS.values()) - set(NEVER)
    pieces_root = layout.relative(layout.pieces_dir)
    archives_root = f"{PRODUCTION_DIR}/models"
    kept_archives = _kept_archives(layout, keep)
    oldest_kept = min((name[:4] for name in kept_archives), default="")
    groups: dict[tuple[str, str], list[str]] = {}
    for name in objects:
        parts = name.split("/")
        if name.startswith(f"{pieces_root}/") and len(parts) > 3:
            groups.setdefault(("pieces", "/".join(parts[:3])), []).append(name)
        elif name.startswith(f"{archives_root}/") and len(parts) > 2:
            if _old_archive(parts[2], kept_archives) and parts[2][:4] < oldest_kept:
                groups.setdefault(("archive", "/".join(parts[:3])), []).append(name)
        elif (folder := _stored_stage_folder(parts, bases)) is not None:
            groups.setdefault(("stage", folder), []).append(name)
        elif (folder := _stored_leftover(name, parts, bases)) is not None:
            groups.setdefault(("leftover", folder), []).append(name)
    return groups


def _stored_leftover(name: str, parts: list[str], bases: set[str]) -> str | None:
    """The working folder (`.<key>.partial` of a stage base) or lease that a stored object
    is, or is in."""
    if name.startswith(f"{STORE_LEASES}/") and name.endswith(".lease"):
        return name
    for index, part in enumerate(parts[:-1]):
        if LEFTOVER.match(part) and _below_a_base(parts, index, bases):
            return "/".join(parts[: index + 1])
    return None


def _pieces_named(store: ObjectStore, folders: list[str]) -> set[str] | None:
    """The piece folders that the records of these stored stage folders name; None when one
    cannot be read (then no piece folder goes)."""
    named: set[str] = set()
    for folder in folders:
        try:
            found = store.read_json(f"{folder}/{RECORD_FILE}")
        except (ValueError, StoreConflict):
            return None
        if found is not None:
            pieces = found[0].get("pieces", []) if isinstance(found[0], dict) else None
            if not isinstance(pieces, list):
                return None
            named.update(str(piece) for piece in pieces)
    return named


def plan(
    layout: Layout,
    keep: int = DEFAULT_KEEP,
    now: float | None = None,
    this_run: str | None = None,
    in_store: bool = True,
) -> PruneReport:
    """Decide what to remove, without removing anything.

    Args:
        layout: a checked artifacts folder (see `check_artifacts`).
        keep: how many of the most recent finished runs to keep the outputs of (at least 1),
            and how many production models to keep the archives of.
        now: the current time (seconds since the epoch), for the age of leftovers.
        this_run: the id of the run pruning, whose own in-progress marker does not count.
        in_store: with a store, prune the store too (else this machine's copy alone).

    Raises:
        ValueError: `keep` is below 1.
        PruneError: one of the kept runs' summaries does not say what it uses.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    now = time.time() if now is None else now
    summaries = _run_summaries(layout)
    kept = summaries[-keep:]
    keys = used_keys(kept) | _production_key(layout)
    # Anything written after the newest finished run may belong to a run in progress.
    newest_run = max((summary.stat().st_mtime for summary in summaries), default=now)
    report = PruneReport(
        layout.root,
        [summary.parent.name for summary in kept],
        location=layout.store.url if layout.store else "",
    )
    report.busy = runs_in_progress(layout.running_dir, besides=this_run)
    if report.busy:
        return report

    def consider(path: Path, kind: str) -> None:
        if path.lstat().st_mtime > newest_run:
            report.skipped_recent.append(path)
        else:
            report.removals.append(Removal(path, kind, size_on_disk(path)))

    kept_folders = []
    for folder in stage_folders(layout):
        if folder.name not in keys:
            consider(folder, "stage")
        else:
            kept_folders.append(folder)
    for path in unused_pieces(layout, kept_folders):
        consider(path, "pieces")
    for path in piece_leftovers(layout):
        if now - _newest_mtime(path) > LEFTOVER_AGE_SECONDS:
            report.removals.append(Removal(path, "leftover", size_on_disk(path)))
    for path in cache_files(layout):
        if path.name not in keys:
            consider(path, "cache")
    for path in leftovers(layout):
        if now - _newest_mtime(path) > LEFTOVER_AGE_SECONDS:
            report.removals.append(Removal(path, "leftover", size_on_disk(path)))
    for path in production_archives(layout, keep):
        report.removals.append(Removal(path, "archive", size_on_disk(path)))
    if layout.store is not None and in_store:
        _store_plan(layout, keys, keep, report, now)
    return report


def prune(
    root: str | os.PathLike[str],
    keep: int = DEFAULT_KEEP,
    dry_run: bool = False,
    now: float | None = None,
    this_run: str | None = None,
    in_store: bool = True,
) -> PruneReport:
    """Remove what the last `keep` runs do not use; with `dry_run`, only say what would go.

    Args:
        root: the artifacts folder.
        keep: how many of the most recent finished runs to keep the outputs of.
        dry_run: report only; delete nothing.
        now: the current time (seconds since the epoch), for the age of leftovers.
        this_run: the id of the run pruning, whose own in-progress marker does not count.
        in_store: with a store, prune the store too (else this machine's copy alone).

    Returns:
        What was (or would be) removed, and how many bytes that frees.

    Raises:
        PruneError: `root` is not a catdog artifacts folder, or a kept run's summary does not
            list what it uses.
    """
    layout = check_artifacts(root)
    # Refusals touch nothing.
    report = plan(layout, keep=keep, now=now, this_run=this_run, in_store=in_store)
    report.dry_run = dry_run
    if dry_run or not report.removals:
        return report
    # The gate's lock: no promotion or rollback changes the registry while archives go.
    with exclusive_lock(layout.gate_lock) if layout.production_dir.is_dir() else nullcontext():
        report = plan(layout, keep=keep, now=now, this_run=this_run, in_store=in_store)
        for removal in report.removals:
            if removal.stored:
                assert layout.store is not None
                for batch in removal.stored:
                    layout.store.delete_objects(batch)
                log.info("removed %s from the store", removal.path)
                continue
            archived = removal.kind == "archive"
            if not archived and not _inside(layout, removal.path):  # re-checked at the end
                continue
            if removal.path.is_dir() and not removal.path.is_symlink():
                shutil.rmtree(removal.path)
            else:
                removal.path.unlink(missing_ok=True)
            log.info("removed %s (%s)", removal.path, human_bytes(removal.size))
    _forget_missing_hashes(layout)
    return report


def _forget_missing_hashes(layout: Layout) -> None:
    """Drop remembered file hashes of files that no longer exist."""
    for memo in (layout.hash_memo, layout.image_hashes):
        try:
            entries = json.loads(memo.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        kept = {path: entry for path, entry in entries.items() if Path(path).exists()}
        if len(kept) != len(entries):
            atomic_write_json(memo, kept, compact=True)
