"""The stage table is the one place: a stage added to it (with its record), a task that
declares it, and the flow's line that submits it run through the flow like any other stage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from catdog.stages import STAGES
from tests.conftest import REPO, flow_command, flow_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

TALLY_RECORD = """

@dataclass(frozen=True)
class TallyRecord(Record):
    images: int = 0  # images in the split, every part together


STAGES: tuple[Stage, ...] = ("""
ENTRY = '    Stage("{}", "{}", "03_splits/{}", ("catdog.data.counts",), {}),\n'
COUNT_ENTRY = ENTRY.format("count", "count_labels", "counts", "CountsRecord")
TALLY_ENTRY = ENTRY.format("tally", "tally_images", "tallies", "TallyRecord")

TALLY_TASK = '''"""A stage added for a test: the split's images, counted."""

import json

from catdog.layout import Layout
from catdog.stage_records import SplitRecord
from tasks.caching import stage_output, stage_task
from tasks.data import split_manifest_of


@stage_task("tally")
def tally_images(split: SplitRecord, artifacts: str):
    """How many images the split holds."""
    layout = Layout.at(artifacts)
    with stage_output(layout) as out:
        images = len(split_manifest_of(layout, split).images)
        (out.folder / "tally.json").write_text(json.dumps({"images": images}))
        out.facts["images"] = images
    return out.record
'''

SUBMIT_AFTER = '        counts = run.submit("count", split=split)\n'


def _copy_of_the_project(folder: Path) -> Path:
    for package in ("catdog", "tasks", "flows"):
        shutil.copytree(
            REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return folder


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path.name} changed: {old!r} is not there once"
    path.write_text(text.replace(old, new))


def _add_to_the_table(checkout: Path) -> None:
    """The new stage's record and its entry, after `count` (stage order is --refresh's)."""
    table = checkout / "catdog/stages.py"
    _edit(table, "\n\nSTAGES: tuple[Stage, ...] = (", TALLY_RECORD)
    _edit(table, COUNT_ENTRY, COUNT_ENTRY + TALLY_ENTRY)


def _run(checkout: Path, data: Path, artifacts: Path, home: Path, *extra: str) -> dict:
    command = [*flow_command(data, artifacts, epochs=1, checkout=checkout), *extra]
    env = flow_env(home, PYTHONPATH=str(checkout))
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600, cwd=home.parent
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((artifacts / "summary.json").read_text())


def test_a_stage_added_to_the_table_runs_through_the_flow(dataset_zip, tmp_path):
    checkout = _copy_of_the_project(tmp_path / "checkout")
    # The table, with its record; a task in a module of its own; the flow's line.
    _add_to_the_table(checkout)
    (checkout / "tasks/tally.py").write_text(TALLY_TASK)
    _edit(
        checkout / "flows/train_flow.py",
        SUBMIT_AFTER,
        SUBMIT_AFTER + '        run.submit("tally", split=split)\n',
    )
    artifacts, home = tmp_path / "artifacts", tmp_path / "home"

    first = _run(checkout, dataset_zip, artifacts, home)
    assert first["tasks"]["tally_images"] == "Completed"
    (output,) = (artifacts / "03_splits/tallies").iterdir()
    record = json.loads((output / "record.json").read_text())
    split_dir = next(d for d in first["artifacts_used"] if d.startswith("03_splits/splits/"))
    split = json.loads((artifacts / split_dir / "split.json").read_text())
    assert record["stage"] == "tally" and record["images"] == len(split["images"]) > 0
    assert "tally.json" in record["files"]

    # Cached like any stage, and --refresh takes its name (it and every later stage rerun).
    second = _run(checkout, dataset_zip, artifacts, home)
    assert second["tasks"]["tally_images"] == "Cached"
    third = _run(checkout, dataset_zip, artifacts, home, "--refresh", "tally")
    assert third["tasks"]["tally_images"] == "Completed"
    assert third["tasks"]["count_labels"] == "Cached"
    assert third["tasks"]["decode_images[32]"] == "Completed"  # after tally in the table


def test_a_stage_whose_task_no_module_declares_stops_at_import(tmp_path):
    checkout = _copy_of_the_project(tmp_path / "checkout")
    _add_to_the_table(checkout)
    result = subprocess.run(
        [sys.executable, "-c", "import flows.pipeline"],
        env={"PYTHONPATH": str(checkout), "PATH": "/usr/bin:/bin"},
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "no task in tasks/ declares the stages' tasks tally_images" in result.stderr


def test_every_stage_of_the_table_has_its_task():
    from flows.pipeline import TASKS

    assert set(TASKS) == {stage.task for stage in STAGES}
