"""How a run ends when a stage fails: one `error:` line naming the stage and its cause, exit
code 2 for bad input and 1 for anything else, no traceback, nothing half-written, the rest of
the run stopped, and a rerun that reuses every stage before the one that failed."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from catdog.errors import DataError, RunStopped, StageFailed, StageInputError
from catdog.layout import STAGE_DIRS
from catdog.stages import STAGES
from flows.pipeline import settle
from tests.conftest import ALWAYS_RUN, flow_command, flow_env, make_dataset, zip_folder

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

# ----------------------------------------------------------------------------- settle alone


@task
def passes(value: int) -> int:
    return value


@task
def fails(kind: type[Exception], message: str) -> None:
    raise kind(message)


# Set when settle asks the rest of the run to stop: tasks in the flow's threads wait on it, so
# that the order under test never depends on timing.
STOPPED = threading.Event()


@task
def busy_until_stopped() -> None:
    """Runs while settle hears of a failure: ends once the rest is told to stop."""
    assert STOPPED.wait(timeout=120), "settle never asked the rest to stop"


@task
def fails_second(kind: type[Exception], message: str) -> None:
    """Fails once settle has seen another failure and asked the rest to stop."""
    assert STOPPED.wait(timeout=120), "settle never asked the rest to stop"
    raise kind(message)


def _stop(stops: list[str]):
    def stop(label: str) -> None:
        stops.append(label)
        STOPPED.set()

    return stop


@task
def leaves_a_mark(path: Path) -> None:
    path.write_text("ran")


def test_settle_raises_the_first_failure_and_never_starts_what_was_queued(tmp_path):
    stops: list[str] = []
    STOPPED.clear()

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=1))
    def run() -> None:
        futures = {
            "first": passes.submit(1),
            "broken[a]": fails.submit(DataError, "--data x.zip: only one class folder"),
            "after": passes.submit(2, wait_for=[]),
            # Runs until settle hears of the failure; what is queued behind it never starts.
            "busy": busy_until_stopped.submit(),
            "queued": leaves_a_mark.submit(tmp_path / "queued"),
        }
        futures["downstream"] = passes.submit(futures["broken[a]"])
        settle(futures, _stop(stops))

    with pytest.raises(StageInputError) as raised:
        run()
    assert str(raised.value) == "broken[a] failed: --data x.zip: only one class folder"
    assert isinstance(raised.value.__cause__, DataError)
    assert stops == ["broken[a]"]
    assert not (tmp_path / "queued").exists()


def test_settle_reports_the_first_real_failure_in_stage_order_with_its_type(tmp_path):
    stops: list[str] = []
    STOPPED.clear()

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=3))
    def run() -> None:
        settle(
            {
                "stopped": fails.submit(RunStopped, "stopped: the run stopped"),
                # Fails second, but comes first in stage order: the one reported.
                "decode_images[32]": fails_second.submit(
                    OSError, "[Errno 28] No space left on device"
                ),
                "train_model[model1]": fails.submit(ValueError, "later in stage order"),
            },
            _stop(stops),
        )

    with pytest.raises(StageFailed) as raised:
        run()
    assert not isinstance(raised.value, StageInputError)  # not bad input: exit code 1
    assert str(raised.value) == (
        "decode_images[32] failed: OSError: [Errno 28] No space left on device"
    )
    assert stops == ["train_model[model1]"]  # the first failure seen stopped the rest


def test_settle_returns_every_ending_when_nothing_fails():
    @flow(task_runner=ThreadPoolTaskRunner(max_workers=1))
    def run() -> dict:
        return settle({"a": passes.submit(1), "b": passes.submit(2)}, lambda label: None)

    endings = run()
    assert [(end.state, end.result) for end in endings.values()] == [
        ("Completed", 1),
        ("Completed", 2),
    ]


# ----------------------------------------------------------------------------- through the CLI

MODELS = "model1,model4"
# Each stage's task run in these runs (model4 is the one with features), from the stage table;
# but the data checks (they write nothing that a file can block) and the proposal (asked for
# only with --approve-promotion).
LABELS = {
    stage.name: stage.label_for(
        {"image_size": 32, "model": "model4" if stage.name == "features" else "model1"}
    )
    for stage in STAGES
    if stage.name not in ("check", "propose")
}
# Where a blocked stage cannot write: a cached stage's folder (model1's own, for a stage with a
# folder per model), the gate's archive of promoted models, the run reports.
UNCACHED_FOLDERS = {"promote": "production/models", "report": "05_reports/runs"}
# A model trained again is new bytes (its file says when it was saved, its config which process
# trained it and how long each epoch took): a stage that read the earlier one computes again.
READERS_OF_NEW_BYTES = {"train": ("evaluate",)}


def _cli(artifacts: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    data = tmp_path / "tiny.zip"
    if not data.exists():
        zip_folder(make_dataset(tmp_path / "src"), data, prefix="tiny_filtered/")
    command = [
        *flow_command(data, artifacts, epochs=1, models=MODELS),
        "--weights",
        "none",
        "--transfer-image-size",
        "32",
        *extra,
    ]
    return _run(command, tmp_path)


def _run(command: list, tmp_path: Path) -> subprocess.CompletedProcess:
    """A flow command as a user runs it, in `tmp_path`, against this session's API."""
    return subprocess.run(
        command,
        env=flow_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )


def _stage_folder(artifacts: Path, stage: str) -> Path:
    if stage in UNCACHED_FOLDERS:
        return artifacts / UNCACHED_FOLDERS[stage]
    per_model = next(s for s in STAGES if s.name == stage).per_model
    return artifacts / STAGE_DIRS[stage] / ("model1" if per_model else "")


def _block(folder: Path) -> None:
    """A file where the stage must write: a real failure, as of a disk or a mount gone bad."""
    if folder.exists():
        folder.rename(folder.with_name(folder.name + ".aside"))
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("in the way\n")


def _unblock(folder: Path) -> None:
    folder.unlink()
    aside = folder.with_name(folder.name + ".aside")
    if aside.exists():
        aside.rename(folder)


SEEN_RUNS: set[object] = set()


def _last_flow_run() -> tuple[object, dict[str, object]]:
    """The newest flow run in this session's API (a new one), and its task runs by run name."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
        assert run.id not in SEEN_RUNS, "the command made no flow run"
        SEEN_RUNS.add(run.id)
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )
    # Stages named without an input ("promote_model") get a random suffix from Prefect.
    return run, {(t.name if "[" in t.name else t.name.rsplit("-", 1)[0]): t for t in task_runs}


def _leftovers(artifacts: Path) -> list[Path]:
    return [p for p in artifacts.rglob("*") if ".tmp" in p.name or p.name.endswith(".aside")]


def _fail_at_every_stage_in_turn(tmp_path: Path, *runner: str, every: slice = slice(None)) -> None:
    """On a fresh artifacts folder, block each stage in turn (`every`: those of the stage
    order it picks), in stage order: each run fails at its stage; the next, that cause
    removed, computes the stage and reuses every one before."""
    artifacts = tmp_path / "artifacts"
    order = list(LABELS)[every]
    reusable: set[str] = set()  # stages completed by earlier runs
    for number, stage in enumerate(order):
        summary = artifacts / "summary.json"
        summary_before = summary.read_bytes() if summary.exists() else None
        folder = _stage_folder(artifacts, stage)
        _block(folder)
        result = _cli(artifacts, tmp_path, *runner)
        _unblock(folder)

        label = LABELS[stage]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 1, (stage, result.stderr[-3000:])
        assert len(errors) == 1 and errors[0].startswith(f"error: {label} failed: "), errors
        terminal = result.stderr + result.stdout
        assert "Traceback" not in terminal and "NotReady" not in terminal, (stage, terminal)
        assert not _leftovers(artifacts), (stage, _leftovers(artifacts))
        assert (summary.read_bytes() if summary.exists() else None) == summary_before, stage
        assert not list(artifacts.glob("05_reports/runs/*")), stage  # no report of a failed run

        run, states = _last_flow_run()
        assert run.state.is_failed() and errors[0].removeprefix("error: ") in run.state.message
        assert states[label].state.name == "Failed", (stage, states[label].state)
        # (On a cluster a stage may have run early, beside an earlier one that failed: its
        # output is blocked now too.)
        for earlier in (reusable - {label}) & states.keys():
            assert states[earlier].state.name == "Cached", (stage, earlier, states[earlier].state)
        if number:
            # The stage that failed last time ran, its cause removed; on a cluster it may
            # instead have been stopped, running beside the stage that failed this time.
            before = states[LABELS[order[number - 1]]].state
            stopped = runner and before.name == "Failed" and "RunStopped" in before.message
            assert before.name == "Completed" or stopped, (stage, before)
        reusable = (reusable - {label}) | {
            name
            for name, task_run in states.items()
            if task_run.state.name in ("Completed", "Cached") and name not in ALWAYS_RUN
        }
        # (On a cluster such a stage may have completed beside the one that failed.)
        reusable -= {LABELS[reader] for reader in READERS_OF_NEW_BYTES.get(stage, ())}

    rerun = _cli(artifacts, tmp_path, *runner)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((artifacts / "summary.json").read_text())
    assert {task for task, state in summary["tasks"].items() if state != "Cached"} == ALWAYS_RUN


def test_a_failure_at_every_stage_ends_in_one_line_and_a_rerun_resumes(tmp_path):
    _fail_at_every_stage_in_turn(tmp_path)


# A running cluster fails at every other stage (the second, fourth, ...); the run's own cluster,
# which starts and stops with each run (the slowest to run again), at the third, seventh,
# eleventh and fifteenth, the last: the rerun after it computes nothing but what every run does.
def test_the_same_on_the_runs_own_dask_cluster(tmp_path):
    _fail_at_every_stage_in_turn(
        tmp_path, "--runner", "dask", "--workers", "2", every=slice(2, None, 4)
    )


def test_the_same_on_a_running_dask_cluster(tmp_path, dask_cluster):
    _fail_at_every_stage_in_turn(
        tmp_path, "--dask-address", dask_cluster.address, every=slice(1, None, 2)
    )
    # Bad input that only a stage finds (a hostile member), raised on a worker: exit 2.
    hostile = _archive(tmp_path / "hostile.zip", HOSTILE["traversal"][0](tmp_path))
    result = subprocess.run(
        [
            *flow_command(hostile, tmp_path / "other", epochs=1),
            "--dask-address",
            dask_cluster.address,
        ],
        env=flow_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: extract_dataset failed: --data ") and "'..'" in errors[0]


# ----------------------------------------------------------------------------- hostile data


def _archive(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in members:
            archive.writestr(member, data)
    return path


def _symlink(name: str) -> zipfile.ZipInfo:
    import stat

    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _with_images(tmp_path: Path, extra: list) -> list:
    images = make_dataset(tmp_path / "good", train=2, validation=2)
    members = [
        (f"d/{path.relative_to(images).as_posix()}", path.read_bytes())
        for path in sorted(images.rglob("*.jpg"))
    ]
    return members + extra


HOSTILE = {
    "traversal": (lambda t: _with_images(t, [("d/../../x.jpg", b"x")]), "contains '..'"),
    "absolute": (lambda t: _with_images(t, [("/tmp/x.jpg", b"x")]), "has an absolute path"),
    "symlink": (
        lambda t: _with_images(t, [(_symlink("d/train/cats/l.jpg"), b"/etc")]),
        "is a symbolic link",
    ),
    "bomb": (lambda t: _with_images(t, [("d/zeros.bin", bytes(3 << 20))]), "likely zip bomb"),
    "no images": (lambda t: [("d/readme.txt", b"no images")], "has no class folders"),
    "one class": (
        lambda t: [
            (f"d/{split}/cats/{i}.jpg", b"x") for split in ("train", "validation") for i in (0, 1)
        ],
        "only one class folder (cats/)",
    ),
}


def _hostile(tmp_path: Path, case: str, *runner: str) -> None:
    members, expected = HOSTILE[case]
    data = _archive(tmp_path / "data.zip", members(tmp_path))
    artifacts = tmp_path / "artifacts"
    before = set(tmp_path.rglob("*"))
    command = [*flow_command(data, artifacts, epochs=1), *runner]
    result = _run(command, tmp_path)
    outside = [
        path
        for path in set(tmp_path.rglob("*")) - before
        if not path.is_relative_to(artifacts) and not path.is_relative_to(tmp_path / "home")
    ]
    assert not outside
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and expected in errors[0] and f"--data {data}" in errors[0], errors
    # What the terminal shows: no traceback, nothing of the stages that never ran.
    terminal = result.stderr + result.stdout
    assert "Traceback" not in terminal and "NotReady" not in terminal, terminal[-3000:]
    assert not Path("/tmp/x.jpg").exists()
    assert not list(artifacts.glob("02_images/*/images"))  # nothing extracted


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_or_unusable_archives_end_in_one_line_and_exit_2(tmp_path, case):
    _hostile(tmp_path, case)


@pytest.mark.parametrize("runner", ["dask", "dask-address"])
@pytest.mark.parametrize("case", ["traversal", "symlink", "bomb"])
def test_hostile_archives_on_a_cluster_end_in_the_same_one_line(tmp_path, case, runner, request):
    """The stages run in Dask's worker processes there; those of `--runner dask` print to the
    run's terminal."""
    if runner == "dask":
        _hostile(tmp_path, case, "--runner", "dask")
    else:
        address = request.getfixturevalue("dask_cluster").address
        _hostile(tmp_path, case, "--dask-address", address)


# ----------------------------------------------------------------------------- stopping the rest


def _epochs(artifacts: Path, model: str) -> list[dict]:
    logs = list((artifacts / "04_models" / model).glob(".*.partial/train-epochs.json"))
    return [row for log in logs for row in json.loads(log.read_text()).values()]


@pytest.mark.parametrize("runner", ["sequential", "dask"])
def test_a_training_that_fails_stops_the_others_within_an_epoch(tmp_path, runner, request):
    artifacts = tmp_path / "artifacts"
    data = zip_folder(make_dataset(tmp_path / "src", train=40), tmp_path / "tiny.zip")
    # Epochs long enough to tell one from the next, and enough of them that model1 is still
    # training when another model, on the cluster's other worker, has logged its first epoch
    # (under a loaded CI machine 60 were not always enough). The run stops at the failure.
    command = [*flow_command(data, artifacts, epochs=300, models="model1,model2,model3")]
    command += ["--image-size", "96"]
    if runner == "dask":
        command += ["--dask-address", request.getfixturevalue("dask_cluster").address]
    run = subprocess.Popen(
        command,
        env=flow_env(tmp_path / "home"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    output: dict[str, str] = {}
    reader = threading.Thread(
        target=lambda: output.update(zip(("out", "err"), run.communicate(timeout=600), strict=True))
    )
    reader.start()
    deadline = time.monotonic() + 300
    while len(_epochs(artifacts, "model1")) < 2:
        assert run.poll() is None and time.monotonic() < deadline, output
        time.sleep(0.02)
    # On the cluster, wait for another model to train beside model1 on the other worker. The
    # scheduler may instead keep the others queued behind model1 on its worker (it places
    # a task where its inputs are; tests/conftest.py's cluster makes it move them early, but
    # not always at once): then the failure must end them before they start.
    beside_deadline = time.monotonic() + 60
    while runner == "dask" and not (_epochs(artifacts, "model2") or _epochs(artifacts, "model3")):
        assert run.poll() is None, output
        if time.monotonic() > beside_deadline:
            break
        time.sleep(0.02)
    # model1's working folder goes bad mid-training: its next epoch cannot be saved.
    (partial,) = (artifacts / "04_models/model1").glob(".*.partial")
    partial.rename(partial.with_name("gone"))
    partial.write_text("in the way\n")
    reader.join(timeout=600)
    assert not reader.is_alive() and "err" in output, "the run did not end"

    errors = [line for line in output["err"].splitlines() if line.startswith("error:")]
    assert run.returncode == 1 and len(errors) == 1, output["err"][-3000:]
    assert errors[0].startswith("error: train_model[model1] failed: ")
    flow_run, states = _last_flow_run()
    assert flow_run.state.is_failed() and errors[0].removeprefix("error: ") in (
        flow_run.state.message
    )
    failed_at = states["train_model[model1]"].state.timestamp.timestamp()
    epochs = {model: _epochs(artifacts, model) for model in ("model2", "model3")}
    after = {
        model: sum(row["finished_at"] > failed_at for row in rows) for model, rows in epochs.items()
    }
    assert max(after.values()) <= 1, after
    total = {model: len(rows) for model, rows in epochs.items()}
    assert sum(total.values()) < 2 * 300, total  # neither trained to the end
    if runner == "sequential":
        assert total == {"model2": 0, "model3": 0}  # queued behind model1: never started
    elif sum(total.values()):  # beside model1 on the other worker: it stopped within an epoch
        started = [
            states[f"train_model[{m}]"].start_time for m in epochs if f"train_model[{m}]" in states
        ]
        assert any(start and start.timestamp() < failed_at for start in started), states
    else:  # queued behind model1 on its worker: they ended without training
        assert all(
            states[f"train_model[{m}]"].state.is_failed()
            for m in epochs
            if f"train_model[{m}]" in states
        ), states
    print(f"{runner}: epochs after model1 failed {after}, in all {total}")
