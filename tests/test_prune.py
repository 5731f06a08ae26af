"""`python -m catdog cache prune` on a fake artifacts folder of real files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path

import pytest

from catdog.__main__ import main
from catdog.prune import PruneError, prune
from catdog.registry import Production

DAY = 24 * 3600.0
NOW = time.time()
OLD = NOW - 10 * DAY
CACHE_DIRS = ("cache-keys", "results")


def key(stage: str, label: str) -> str:
    return f"{stage}-{hashlib.sha256(label.encode()).hexdigest()[:32]}"


def write(path: Path, size: int, mtime: float = OLD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (mtime, mtime))
    return path


def stage_folder(root: Path, relative: str, size: int = 1000, mtime: float = OLD) -> Path:
    """A stage output folder with a record and one data file, plus its Prefect cache files."""
    folder = root / relative
    write(folder / "record.json", 10, mtime)
    write(folder / "data.bin", size, mtime)
    os.utime(folder, (mtime, mtime))
    write(root / ".prefect" / "cache-keys" / folder.name, 100, mtime)
    write(root / ".prefect" / "results" / folder.name, 200, mtime)
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


@pytest.fixture
def artifacts(tmp_path: Path) -> dict:
    """Five runs; runs share the data stages two by two and each has its own model."""
    root = tmp_path / "artifacts"
    runs: list[dict] = []
    for number in range(5):
        data = number // 2  # runs 0,1 share data 0; 2,3 share data 1; 4 has data 2
        used = [
            f"01_raw/{key('download', f'd{data}')}",
            f"02_images/{key('extract', f'd{data}')}",
            f"03_splits/arrays/{key('decode', f'd{data}')}",
            f"04_models/model1/{key('train', f'r{number}')}",
            f"04_models/model1/{key('evaluate', f'r{number}')}",
        ]
        for relative in used:
            if not (root / relative).exists():
                stage_folder(root, relative, size=200_000 * (number + 1))
        run_dir = root / "05_reports" / "runs" / f"2026112{number}T030000Z-abcdef0{number}"
        summary = run_dir / "summary.json"
        summary.parent.mkdir(parents=True)
        summary.write_text(json.dumps({"artifacts_used": used, "run": {"id": str(number)}}))
        os.utime(summary, (OLD + 60 * (number + 1), OLD + 60 * (number + 1)))
        write(run_dir / "report.md", 50)
        runs.append({"used": used, "dir": run_dir})
    write(root / "summary.json", 30)
    write(root / "production" / "model.keras", 500)
    (root / "production" / "registry.json").write_text(json.dumps({"source": "elsewhere"}))
    write(root / ".prefect" / "file-hashes.json", 40)
    write(root / ".prefect" / "results" / "not-a-stage-key", 40)
    write(root / "05_reports" / "figures" / "comparison-0123456789abcdef.png", 40)
    return {"root": root, "runs": runs}


def test_prune_keeps_the_last_runs_and_removes_the_rest(artifacts: dict) -> None:
    root, runs = artifacts["root"], artifacts["runs"]
    kept = {rel for run in runs[-3:] for rel in run["used"]}
    dropped = {rel for run in runs[:2] for rel in run["used"]} - kept
    expected_bytes = sum(folder_bytes(root / rel) + 300 for rel in dropped)
    before = sorted(p for p in root.rglob("*") if p.is_file())

    report = prune(root, keep=3, now=NOW)

    assert report.kept_runs == [run["dir"].name for run in runs[-3:]]
    assert report.freed_bytes == expected_bytes
    assert report.count("stage") == len(dropped)
    assert report.count("cache") == 2 * len(dropped)
    for rel in kept:
        assert (root / rel / "data.bin").is_file(), rel
        name = Path(rel).name
        assert (root / ".prefect" / "cache-keys" / name).is_file()
        assert (root / ".prefect" / "results" / name).is_file()
    for rel in dropped:
        name = Path(rel).name
        assert not (root / rel).exists(), rel
        assert not (root / ".prefect" / "cache-keys" / name).exists()
        assert not (root / ".prefect" / "results" / name).exists()
    # Everything that is not a stage output or its cache entry is untouched.
    after = sorted(p for p in root.rglob("*") if p.is_file())
    removed = set(before) - set(after)
    for survivor in (
        "summary.json",
        "production/model.keras",
        "production/registry.json",
        ".prefect/file-hashes.json",
        ".prefect/results/not-a-stage-key",
        "05_reports/figures/comparison-0123456789abcdef.png",
        *(f"{run['dir'].relative_to(root)}/summary.json" for run in runs),
    ):
        assert (root / survivor).is_file(), survivor
    assert removed == {
        *(root / rel / name for rel in dropped for name in ("record.json", "data.bin")),
        *(root / ".prefect" / sub / Path(rel).name for rel in dropped for sub in CACHE_DIRS),
    }

    again = prune(root, keep=3, now=NOW)
    assert again.removals == [] and again.freed_bytes == 0


def _production(archive: str, source: str = "elsewhere", exports: str | None = None) -> Production:
    return Production(
        model="model1",
        epoch=1,
        archive=archive,
        source=source,
        test_accuracy=0.5,
        val_accuracy=0.5,
        data_hash="d",
        split_hash="s",
        classes=["cats", "dogs"],
        image_size=32,
        code="c",
        run_id="r",
        flow_run=None,
        exports=exports,
    )


def _promotions(root: Path, count: int) -> list[str]:
    """A registry of `count` promotions, each replacing the one before, with a kept decision
    between them; the archived files' stems, oldest first."""
    models = root / "production" / "models"
    history: list[dict] = []
    stems = []
    for number in range(count):
        stem = f"{2 * number:04d}-model1"
        write(models / f"{stem}.keras", 1000)
        write(models / f"{stem}.keras.seen.json", 10)
        write(models / f"{stem}.keras.predictions-0123456789abcdef.json", 10)
        write(models / f"{stem}.export" / "model.tflite", 300)
        replaced = len(history) - 2 if history else None
        installed = _production(
            f"production/models/{stem}.keras", exports=f"production/models/{stem}.export"
        )
        time = f"2026-01-0{number + 1}T00:00:00+00:00"
        promoted = {"time": time, "action": "promote", "reason": "better", "replaced": replaced}
        history.append({**installed.facts(), **promoted})
        kept = {"time": time, "action": "keep", "reason": "not better", "candidate": "model1"}
        history.append({**kept, "replaced": len(history) - 1})
        stems.append(stem)
    current = {**history[-2], "entry": len(history) - 2, "source": "elsewhere"}
    (root / "production" / "registry.json").write_text(json.dumps({**current, "history": history}))
    return stems


def test_only_the_last_production_models_stay_archived(artifacts: dict) -> None:
    from catdog.layout import Layout
    from catdog.registry import RegistryError, rollback

    root = artifacts["root"]
    stems = _promotions(root, 4)
    models = root / "production" / "models"

    report = prune(root, keep=2, now=NOW)

    archived = {path.name for path in models.iterdir()}
    assert {name.split(".")[0] for name in archived} == set(stems[-2:])
    assert report.count("archive") == 2 * 4  # model, seen, predictions, exports of each
    assert "archived production file(s)" in report.render()
    assert (root / "production" / "model.keras").is_file()
    rollback(Layout.at(root))  # back to the model before production's: still archived
    with pytest.raises(RegistryError, match=r"no longer archived.*keeps the last N"):
        rollback(Layout.at(root))


def test_nothing_is_pruned_while_another_run_is_in_progress(artifacts: dict) -> None:
    from catdog.layout import Layout
    from catdog.processes import mark_running, unmark_running

    root = artifacts["root"]
    running = Layout.at(root).running_dir
    marker = mark_running(running, "other-run")
    try:
        report = prune(root, keep=1, now=NOW)
        assert report.busy == ["other-run"] and report.removals == []
        assert "other-run in progress" in report.render()
        assert all((root / rel).exists() for run in artifacts["runs"] for rel in run["used"])
        assert prune(root, keep=1, now=NOW, this_run="other-run").count("stage") > 0
    finally:
        unmark_running(marker)


def test_the_marker_of_a_run_whose_process_is_gone_is_cleared(artifacts: dict) -> None:
    import socket

    from catdog.layout import Layout

    root = artifacts["root"]
    marker = Layout.at(root).running_dir / "crashed-run.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"process": f"{socket.gethostname()}:999999999:1"}))

    report = prune(root, keep=1, now=NOW)

    assert report.busy == [] and report.count("stage") > 0 and not marker.exists()


def test_dry_run_deletes_nothing_and_reports_the_same(artifacts: dict) -> None:
    root = artifacts["root"]
    before = sorted((p, p.stat().st_size) for p in root.rglob("*"))
    dry = prune(root, keep=2, dry_run=True, now=NOW)
    assert sorted((p, p.stat().st_size) for p in root.rglob("*")) == before
    assert dry.dry_run and dry.freed_bytes > 0
    assert "would remove" in dry.render()
    real = prune(root, keep=2, now=NOW)
    assert [r.path for r in real.removals] == [r.path for r in dry.removals]
    assert real.freed_bytes == dry.freed_bytes


def test_keep_more_runs_than_exist_removes_no_stage(artifacts: dict) -> None:
    report = prune(artifacts["root"], keep=10, now=NOW)
    assert report.removals == []
    assert len(report.kept_runs) == 5


def test_production_source_and_recent_outputs_are_kept(artifacts: dict) -> None:
    root, runs = artifacts["root"], artifacts["runs"]
    source = root / runs[0]["used"][3]
    production = _production("production/models/0000-model1.keras", str(source / "model.keras"))
    (root / "production" / "registry.json").write_text(
        json.dumps({**asdict(production), "entry": 0, "history": [{"action": "promote"}]})
    )
    in_progress = stage_folder(root, f"04_models/model2/{key('train', 'live')}", mtime=NOW)
    report = prune(root, keep=1, now=NOW)
    assert source.is_dir()
    assert in_progress.is_dir() and in_progress in report.skipped_recent
    assert (root / ".prefect" / "results" / in_progress.name).is_file()
    assert not (root / runs[0]["used"][4]).exists()


def test_leftovers_older_than_a_day_are_removed(artifacts: dict) -> None:
    root = artifacts["root"]
    stale = [
        write(root / "04_models" / "model1" / ".train-0123abcd.partial" / "ckpt", 70).parent,
        write(root / "03_splits" / "arrays" / ".decode-0123.tmp-1a2b3c4d" / "x.npy", 80).parent,
        write(root / "01_raw" / ".partial" / "download-0123abcd.zip", 90).parent,
    ]
    for folder in stale:
        os.utime(folder, (OLD, OLD))
    fresh = write(root / "04_models" / "model2" / ".train-4567.partial" / "ckpt", 60, NOW).parent
    report = prune(root, keep=5, now=NOW)
    assert report.count("leftover") == 3
    assert report.freed_bytes == 70 + 80 + 90
    assert not any(path.exists() for path in stale)
    assert fresh.is_dir()


def test_links_out_of_the_artifacts_folder_are_not_followed(artifacts: dict, tmp_path) -> None:
    outside = stage_folder(tmp_path / "elsewhere", f"model9/{key('train', 'outside')}").parent
    (artifacts["root"] / "04_models" / "model9").symlink_to(outside, target_is_directory=True)
    prune(artifacts["root"], keep=1, now=NOW)
    assert (outside / key("train", "outside") / "data.bin").is_file()


def test_refuses_a_folder_that_is_not_an_artifacts_folder(tmp_path: Path, capsys) -> None:
    other = tmp_path / "photos"
    write(other / "cat.jpg", 10)
    with pytest.raises(PruneError, match="does not look like a catdog artifacts folder"):
        prune(other)
    assert main(["cache", "prune", "--artifacts", str(other)]) == 2
    assert "does not look like a catdog artifacts folder" in capsys.readouterr().err
    assert (other / "cat.jpg").is_file()
    assert main(["cache", "prune", "--artifacts", str(tmp_path / "missing")]) == 2


def test_refuses_when_a_kept_run_does_not_say_what_it_uses(artifacts: dict) -> None:
    root, runs = artifacts["root"], artifacts["runs"]
    (runs[-1]["dir"] / "summary.json").write_text(json.dumps({"run": {}}))
    before = sorted(root.rglob("*"))
    with pytest.raises(PruneError, match="artifacts_used"):
        prune(root, keep=3)
    assert sorted(root.rglob("*")) == before


def test_cli_reports_count_and_megabytes(artifacts: dict, capsys) -> None:
    root = artifacts["root"]
    args = ["cache", "prune", "--artifacts", str(root), "--keep", "3"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 7 stage folder(s), 14 cache file(s)" in out
    assert "B would be freed" in out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (
        "removed 7 stage folder(s), 14 cache file(s), 0 piece folder(s), 0 leftover(s), 0 archived"
        in out
    )
    assert ": 21 item(s)" in out
    assert "B freed" in out


def test_cli_rejects_keep_below_one(artifacts: dict) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "prune", "--artifacts", str(artifacts["root"]), "--keep", "0"])
    assert exit_info.value.code == 2


def test_cli_help_imports_neither_prefect_nor_tensorflow() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from catdog.__main__ import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['cache', 'prune', '--help'])\n"
        "heavy = [m for m in ('prefect', 'tensorflow', 'keras') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_cli_hands_predict_its_own_arguments(monkeypatch) -> None:
    import catdog

    received: list = []
    fake = types.ModuleType("catdog.predict")
    fake.add_arguments = lambda parser: (  # type: ignore[attr-defined]
        parser.add_argument("inputs", nargs="+"),
        parser.add_argument("--top", type=int),
    )
    fake.run = lambda args: received.append(args) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "catdog.predict", fake)
    monkeypatch.setattr(catdog, "predict", fake, raising=False)
    assert main(["predict", "a.jpg", "b", "--top", "2"]) == 0
    assert received[0].inputs == ["a.jpg", "b"] and received[0].top == 2


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_a_run_keeps_only_what_its_last_runs_used(tmp_path):
    """--keep-runs: after its report, a run removes what none of the last N runs used; the
    folder production's model trained in stays."""
    from tests.conftest import make_dataset, run_flow, zip_folder

    artifacts = tmp_path / "artifacts"
    first = zip_folder(make_dataset(tmp_path / "one", seed=1), tmp_path / "one.zip")
    second = zip_folder(make_dataset(tmp_path / "two", seed=2), tmp_path / "two.zip")
    one = run_flow(first, artifacts, keep_runs=1)
    two = run_flow(second, artifacts, keep_runs=1)
    gone = set(one["artifacts_used"]) - set(two["artifacts_used"])
    assert gone and all(not (artifacts / folder).exists() for folder in gone - _kept(artifacts))
    assert all((artifacts / folder).exists() for folder in two["artifacts_used"])
    production_source = Path(
        json.loads((artifacts / "production/registry.json").read_text())["source"]
    )
    assert production_source.is_file()  # the model production came from, whichever run it was
    three = run_flow(first, artifacts, keep_runs=0)  # 0 keeps everything
    only_two = set(two["artifacts_used"]) - set(three["artifacts_used"]) - _kept(artifacts)
    assert only_two and all((artifacts / folder).exists() for folder in only_two)

    from catdog.layout import Layout
    from catdog.processes import mark_running, unmark_running

    running = Layout.at(artifacts).running_dir
    assert not list(running.glob("*.json"))  # each run's marker goes with it
    marker = mark_running(running, "another-run")  # a run in progress elsewhere
    try:
        four = run_flow(second, artifacts, keep_runs=1)
    finally:
        unmark_running(marker)
    only_three = set(three["artifacts_used"]) - set(four["artifacts_used"]) - _kept(artifacts)
    assert only_three and all((artifacts / folder).exists() for folder in only_three)


def _kept(artifacts: Path) -> set[str]:
    """Stage folders kept for production's lineage (its model's training folder)."""
    source = json.loads((artifacts / "production/registry.json").read_text())["source"]
    return {str(Path(source).parent.relative_to(artifacts))}


def test_pieces_go_when_no_kept_stage_output_names_them(artifacts: dict) -> None:
    """A piece version that a kept run's decode used stays; one only older runs used goes;
    a pack a crashed run was writing goes once it is a day old."""
    root, runs = artifacts["root"], artifacts["runs"]
    used_pieces, old_pieces = "pieces/pixels/aaaa", "pieces/pixels/bbbb"
    kept_decode = root / runs[-1]["used"][2]
    dropped_decode = root / runs[0]["used"][2]
    for folder, pieces in ((kept_decode, used_pieces), (dropped_decode, old_pieces)):
        (folder / "record.json").write_text(json.dumps({"pieces": [pieces]}))
        os.utime(folder / "record.json", (OLD, OLD))
        write(root / pieces / "pack.npy", 5000)
        write(root / pieces / "pack.json", 50)
    write(root / used_pieces / ".tmp-crashed.npy", 700)
    write(root / used_pieces / "sealed-but-not-indexed.npy", 700)
    for pieces in (used_pieces, old_pieces):  # written before the last run finished
        os.utime(root / pieces, (OLD, OLD))

    report = prune(root, keep=3, now=NOW)

    assert report.count("pieces") == 1
    assert (root / used_pieces / "pack.npy").is_file()
    assert not (root / old_pieces).exists()
    assert not (root / used_pieces / ".tmp-crashed.npy").exists()
    assert not (root / used_pieces / "sealed-but-not-indexed.npy").exists()
    assert "1 piece folder(s)" in report.render()
