"""The stage table is the one place: adding a stage is its entry (with its record), a task that
declares it and the flow's line that submits it (`add_a_stage`; tests/test_caching.py runs such
a stage through the flow); a stage without a task stops the flow's import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from catdog.stages import STAGES
from tests.conftest import copy_of_the_project

pytestmark = [pytest.mark.slow]

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


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path.name} changed: {old!r} is not there once"
    path.write_text(text.replace(old, new))


def _add_to_the_table(checkout: Path) -> None:
    """The new stage's record and its entry, after `count` (stage order is --refresh's)."""
    table = checkout / "catdog/stages.py"
    _edit(table, "\n\nSTAGES: tuple[Stage, ...] = (", TALLY_RECORD)
    _edit(table, COUNT_ENTRY, COUNT_ENTRY + TALLY_ENTRY)


def add_a_stage(checkout: Path) -> None:
    """What adding a stage takes, in a copy of the project: the table (with its record), a
    task in a module of its own, and the flow's line that submits it."""
    _add_to_the_table(checkout)
    (checkout / "tasks/tally.py").write_text(TALLY_TASK)
    _edit(
        checkout / "flows/train_flow.py",
        SUBMIT_AFTER,
        SUBMIT_AFTER + '        run.submit("tally", split=split)\n',
    )


def check_the_added_stage(artifacts: Path, summary: dict) -> None:
    """The added stage's output, as the run that computed it left it."""
    (output,) = (artifacts / "03_splits/tallies").iterdir()
    record = json.loads((output / "record.json").read_text())
    split_dir = next(d for d in summary["artifacts_used"] if d.startswith("03_splits/splits/"))
    split = json.loads((artifacts / split_dir / "split.json").read_text())
    assert record["stage"] == "tally" and record["images"] == len(split["images"]) > 0
    assert "tally.json" in record["files"] and output.name == record["key"]
    assert f"03_splits/tallies/{output.name}" in summary["artifacts_used"]


def test_a_stage_whose_task_no_module_declares_stops_at_import(tmp_path):
    checkout = copy_of_the_project(tmp_path / "checkout")
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
