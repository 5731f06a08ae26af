"""Where every artifact lives under the artifacts root (no Prefect).

Each stage's output is a folder named by its cache key (its stage's folder comes from
`catdog.stages`), holding the files and a `record.json` listing them with their hashes, so a
cache hit always points at real files. The other paths the pipeline writes (production, the
run reports, Prefect's cache records, locks and stop requests) are properties here.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from catdog.stages import STAGES
from catdog.store import ObjectStore, is_store_url

# Folder of each stage's outputs, by stage name, in pipeline order (from the stage table).
STAGE_DIRS = {stage.name: stage.folder for stage in STAGES}

RECORD_FILE = "record.json"  # a stage output's record: its key, stage, facts and file hashes
MODEL_FILE = "model.keras"  # a training folder's model: its best epoch by validation accuracy
FINAL_MODEL_FILE = "final.keras"  # a training folder's last epoch
HISTORY_ROWS_FILE = "history-rows.json"  # a training folder's per-epoch metrics
PROBABILITIES_FILE = "probabilities.npy"  # an evaluation's class probabilities per test image
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
REGISTRY_FILE = "registry.json"
MANIFEST_FILE = "manifest.json"  # every image once, validated, hashed, classed
SPLIT_FILE = "split.json"  # the manifest with each image's split
INSPECTION_FILE = "inspection.npz"  # every image's properties and perceptual hash
NEAR_DUPLICATES_FILE = "near_duplicates.json"  # groups of near-identical images, by path
RUNS_DIR = f"{STAGE_DIRS['report']}/runs"
PRODUCTION_DIR = STAGE_DIRS["promote"]


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (links not followed)."""
    if not path.is_dir():
        return path.lstat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += (Path(dirpath) / name).lstat().st_size
    return total


@dataclass(frozen=True)
class Layout:
    root: Path
    # With an object store, `root` is this host's copy of it and the store is the truth (see
    # catdog.store and catdog.mirror).
    store: ObjectStore | None = field(default=None, compare=False)

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> Layout:
        """The layout of a local artifacts folder, or of an object store's URL."""
        if is_store_url(root):
            store = ObjectStore.at(str(root))
            return cls(store.cache_folder, store)
        return cls(Path(root).expanduser().resolve())

    @property
    def location(self) -> str:
        """Where the artifacts are, as a person gave it: the store's URL or the folder."""
        return self.store.url if self.store else str(self.root)

    def output_dir(self, stage: str, key: str, name: str | None = None) -> Path:
        """The folder for one stage's result: `<stage dir>[/<name>]/<key>`."""
        base = self.root / STAGE_DIRS[stage]
        return (base / name / key) if name else base / key

    def relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    def resolve(self, relative: str) -> Path:
        return self.root / relative

    @property
    def prefect_dir(self) -> Path:
        return self.root / ".prefect"

    @property
    def results_dir(self) -> Path:
        return self.prefect_dir / "results"

    @property
    def cache_keys_dir(self) -> Path:
        return self.prefect_dir / "cache-keys"

    @property
    def locks_dir(self) -> Path:
        return self.prefect_dir / "locks"

    @property
    def hash_memo(self) -> Path:
        return self.prefect_dir / "file-hashes.json"

    @property
    def image_hashes(self) -> Path:
        """The source images' hashes by stamp, apart from `hash_memo`: only the manifest
        reads them, and every stage would otherwise load tens of thousands of them."""
        return self.prefect_dir / "image-hashes.json"

    @property
    def sources_memo(self) -> Path:
        """The last good download of each dataset URL (see catdog.data.freshness)."""
        return self.prefect_dir / "sources.json"

    @property
    def pieces_dir(self) -> Path:
        """Per-image results by content (see catdog.pieces), shared by every run."""
        return self.root / "pieces"

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS_DIR

    @property
    def production_dir(self) -> Path:
        return self.root / PRODUCTION_DIR

    @property
    def production_model(self) -> Path:
        return self.production_dir / MODEL_FILE

    @property
    def registry(self) -> Path:
        return self.production_dir / REGISTRY_FILE

    def production_archive(self, number: int, model: str) -> Path:
        """Where the `number`th promoted model is kept for rollback."""
        return self.production_dir / "models" / f"{number:04d}-{model}.keras"

    def production_archive_export(self, number: int, model: str) -> Path:
        """Where the exports of the `number`th promoted model are kept (see catdog.export)."""
        return self.production_dir / "models" / f"{number:04d}-{model}.export"

    @property
    def production_export(self) -> Path:
        """The exports of the production model now: saved_model/, model.tflite, serving.json."""
        return self.production_dir / "export"

    @property
    def gate_lock(self) -> Path:
        """Runs on one artifacts folder take turns at the promotion gate by this lock."""
        return self.production_dir / ".gate.lock"

    @property
    def running_dir(self) -> Path:
        """Markers of the runs in progress on this folder (see catdog.processes)."""
        return self.prefect_dir / "running"

    def stop_request(self, run_id: str) -> Path:
        """Present while run `run_id` is stopping: its stages still queued or training see it
        (on any worker sharing the folder) and stop."""
        return self.prefect_dir / "stops" / run_id
