"""Artifacts in an object store (`--artifacts s3://bucket/prefix`), against a real S3 server
(SeaweedFS on 127.0.0.1, see tests/s3_server.py): the conditional writes S3 promises, sealed
outputs going up whole and coming down checked, a run from a second machine's empty cache all
`Cached`, and a store the run cannot use stopping it before any work."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from catdog.hashing import sha256_file_uncached
from catdog.layout import RECORD_FILE, Layout
from catdog.leases import Leases
from catdog.mirror import fetch_output, production_turn, push_output
from catdog.prune import KEY, LEFTOVER_AGE_SECONDS
from catdog.stages import stage, stage_of_task
from catdog.store import CACHE_ENV, ObjectStore, StoreConflict
from tests.builders import split_facts, write_image
from tests.conftest import (
    ALWAYS_RUN,
    ONE_TF_THREAD,
    computed,
    flow_command,
    flow_env,
    free_port,
    task_run_logs,
)
from tests.hosts import namespaces_refused, on_a_host_of_its_own
from tests.s3_server import BUCKET, SECRET_KEY, S3Server, serving


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with serving(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def store_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3


def _layout(url: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> Layout:
    monkeypatch.setenv(CACHE_ENV, str(cache))
    return Layout.at(url)


def test_the_servers_conditional_writes_are_what_s3_promises(store_env: S3Server) -> None:
    """If-None-Match: * creates once; If-Match writes only over the version that was read."""
    store = ObjectStore.at(f"s3://{store_env.bucket}/conditional")
    store.write_json("registry.json", {"n": 1}, if_match=None)
    with pytest.raises(StoreConflict):
        store.write_json("registry.json", {"n": 2}, if_match=None)
    value, etag = store.read_json("registry.json") or (None, "")
    assert value == {"n": 1}
    store.write_json("registry.json", {"n": 2}, if_match=etag)
    with pytest.raises(StoreConflict):  # etag is the version before this write
        store.write_json("registry.json", {"n": 3}, if_match=etag)
    assert (store.read_json("registry.json") or (None,))[0] == {"n": 2}


def test_each_url_has_a_copy_of_its_own(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    urls = ["s3://b", "s3://b/", "s3://b/a/b", "s3://b/a_b", "s3://b/a%2Fb", "s3://c/a/b"]
    folders = [ObjectStore.at(url).cache_folder for url in urls]
    assert folders[0] == folders[1] and len(set(folders)) == len(urls) - 1
    assert all(folder.parent.parent.parent == tmp_path / "stores" for folder in folders)


def _sealed_output(layout: Layout) -> Path:
    folder = layout.output_dir("count", "count-0123")
    folder.mkdir(parents=True)
    (folder / "counts.json").write_text('{"cats": 3}')
    (folder / "nested").mkdir()
    (folder / "nested" / "rows.npy").write_bytes(b"\x93NUMPY" + bytes(range(200)))
    files = {
        path.relative_to(folder).as_posix(): sha256_file_uncached(path)
        for path in folder.rglob("*")
        if path.is_file()
    }
    (folder / RECORD_FILE).write_text(
        json.dumps({"stage": "count", "key": folder.name, "files": files})
    )
    return folder


def test_pruning_a_store_unseals_first_and_keeps_what_a_run_may_still_use(
    store_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the kept run used stays, with the pieces its records name; an output nobody used
    goes, record first, then the pieces only it named, index first; what was written after
    the last finished run stays."""
    from catdog.prune import prune

    url, client = f"s3://{store_env.bucket}/pruning", store_env.client()

    def put(name: str, body: object = "{}") -> None:
        text = body if isinstance(body, str) else json.dumps(body)
        client.put_object(Bucket=store_env.bucket, Key=f"pruning/{name}", Body=text.encode())

    kept, decoded, stale, recent = (
        "03_splits/counts/count-aaaa1111",
        "03_splits/arrays/decode-bbbb2222",
        "03_splits/counts/count-cccc3333",
        "03_splits/counts/count-dddd4444",
    )
    for folder in (kept, stale):
        put(f"{folder}/{RECORD_FILE}")
        put(f"{folder}/counts.json")
    put(f"{decoded}/{RECORD_FILE}", {"pieces": ["pieces/pixels/v1"]})
    for version in ("v0", "v1"):
        put(f"pieces/pixels/{version}/pack.json")
        put(f"pieces/pixels/{version}/pack.npy", "rows")
    # What a lost host left: a training's checkpoints and the lease of the entry.
    partial = "04_models/model1/.train-eeee5555.partial"
    put(f"{partial}/checkpoint.json")
    put(f"{partial}/final.keras", "weights")
    put(".prefect/locks/train-eeee5555.lease", {"holder": "lost"})
    time.sleep(1.1)  # the store dates objects to the second: the run ends after them
    put("05_reports/runs/20260101T000000Z-run/summary.json", {"artifacts_used": [kept, decoded]})
    time.sleep(1.1)
    put(f"{recent}/{RECORD_FILE}")  # a run in progress elsewhere, sealed after the last run

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty"))
    planned = prune(url, keep=1, dry_run=True)
    assert [(r.kind, r.path.relative_to(planned.root).as_posix()) for r in planned.removals] == [
        ("stage", stale),
        ("pieces", "pieces/pixels/v0"),
    ]
    stage, pieces = (removal.stored for removal in planned.removals)
    assert stage == ((f"{stale}/{RECORD_FILE}",), (f"{stale}/counts.json",))
    assert pieces == (("pieces/pixels/v0/pack.json",), ("pieces/pixels/v0/pack.npy",))
    assert [path.relative_to(planned.root).as_posix() for path in planned.skipped_recent] == [
        recent
    ]
    assert store_env.keys(f"pruning/{stale}/")  # a dry run removes nothing
    # Leftovers go once nothing in them changed for a day.
    later = prune(url, keep=1, dry_run=True, now=time.time() + LEFTOVER_AGE_SECONDS + 60)
    assert [(r.kind, r.path.relative_to(later.root).as_posix()) for r in later.removals][2:] == [
        ("leftover", ".prefect/locks/train-eeee5555.lease"),
        ("leftover", partial),
    ]

    prune(url, keep=1)
    left = {key.removeprefix("pruning/") for key in store_env.keys("pruning/")}
    assert not any(key.startswith((f"{stale}/", "pieces/pixels/v0/")) for key in left)
    assert {f"{kept}/{RECORD_FILE}", f"{decoded}/{RECORD_FILE}", f"{recent}/{RECORD_FILE}"} <= left
    assert {"pieces/pixels/v1/pack.json", "pieces/pixels/v1/pack.npy"} <= left


def test_a_sealed_output_comes_down_whole_and_checked(
    store_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{store_env.bucket}/roundtrip"
    first = _layout(url, tmp_path / "first", monkeypatch)
    folder = _sealed_output(first)
    push_output(first, folder)
    keys = store_env.keys("roundtrip/")
    assert keys[-1:] != [] and f"roundtrip/{first.relative(folder)}/{RECORD_FILE}" in keys

    second = _layout(url, tmp_path / "second", monkeypatch)
    there = second.resolve(first.relative(folder))
    assert fetch_output(second, there)
    for path in folder.rglob("*"):
        if path.is_file():
            assert (there / path.relative_to(folder)).read_bytes() == path.read_bytes()

    # A damaged object in the store: nothing comes down, and the output is sealed again later.
    damaged = f"roundtrip/{first.relative(folder)}/nested/rows.npy"
    store_env.client().put_object(Bucket=store_env.bucket, Key=damaged, Body=b"not the rows")
    third = _layout(url, tmp_path / "third", monkeypatch)
    assert not fetch_output(third, third.resolve(first.relative(folder)))
    assert not (third.root / "02_images").exists() or not any((third.root / "02_images").rglob("*"))
    assert f"roundtrip/{first.relative(folder)}/{RECORD_FILE}" not in store_env.keys("roundtrip/")

    # Sealed again; then a file gone from under its record (a prune cut short): the same.
    assert push_output(first, folder)
    store_env.client().delete_object(Bucket=store_env.bucket, Key=damaged)
    fourth = _layout(url, tmp_path / "fourth", monkeypatch)
    assert not fetch_output(fourth, fourth.resolve(first.relative(folder)))
    assert f"roundtrip/{first.relative(folder)}/{RECORD_FILE}" not in store_env.keys("roundtrip/")


def test_a_host_that_never_fetched_an_output_sizes_it_from_the_store(
    store_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's disk use, in its summary, counted on the host that writes the report: an
    output another worker sealed (the download, say) is sized from the store, not fetched."""
    from catdog.summary import disk_bytes

    url = f"s3://{store_env.bucket}/sizes"
    first = _layout(url, tmp_path / "first", monkeypatch)
    folder = _sealed_output(first)
    push_output(first, folder)
    relative = first.relative(folder)
    here = disk_bytes(first, [relative])
    elsewhere = _layout(url, tmp_path / "elsewhere", monkeypatch)
    assert disk_bytes(elsewhere, [relative]) == here and here["total"] > 0
    assert not elsewhere.resolve(relative).exists()  # nothing fetched to count it
    assert disk_bytes(elsewhere, ["02_images/extract-0000"]) == {"total": 0}


def test_production_changes_between_hosts_are_compare_and_swap(
    store_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host's turn at production writes the registry only over the version it read: a rival
    host that wrote first wins, this turn raises StoreConflict, and the next turn decides on the
    rival's registry, so the history stays whole and in order."""
    url = f"s3://{store_env.bucket}/turns"
    host = _layout(url, tmp_path / "host", monkeypatch)
    store = host.store
    assert store is not None

    def decide(model: str) -> None:
        registry = json.loads(host.registry.read_text()) if host.registry.is_file() else {}
        history = registry.get("history", [])
        archive = host.production_archive(len(history), model)
        archive.parent.mkdir(parents=True, exist_ok=True)
        archive.write_bytes(model.encode())
        host.registry.write_text(json.dumps({"history": [*history, {"model": model}]}))

    with pytest.raises(StoreConflict), production_turn(host):
        decide("model2")
        rival = {"history": [{"model": "model1"}]}
        store.write_json("production/registry.json", rival, if_match=None)
    assert not (host.production_dir / "models/0000-model2.keras").exists()  # dropped here
    with production_turn(host):
        decide("model2")
    registry, etag = store.read_json("production/registry.json") or ({}, "")
    assert [entry["model"] for entry in registry["history"]] == ["model1", "model2"]
    assert "turns/production/models/0001-model2.keras" in store_env.keys("turns/")

    # A turn that decides nothing writes nothing: a rival's decision meanwhile stands.
    with production_turn(host):
        rival = {"history": [*registry["history"], {"model": "model3"}]}
        store.write_json("production/registry.json", rival, if_match=etag)
    registry, _ = store.read_json("production/registry.json") or ({}, "")
    assert [entry["model"] for entry in registry["history"]] == ["model1", "model2", "model3"]


def test_a_turn_that_lost_production_to_another_host_does_not_export_again(
    store_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate's exports are made and checked once: a turn whose registry write lost to a
    rival host decides again on the rival's registry, with the exports the first turn made."""
    from catdog.candidates import Candidate
    from catdog.export import ExportCheck, RuntimeCheck
    from catdog.gate import promote
    from catdog.stage_records import Policy

    url = f"s3://{store_env.bucket}/reship"
    host = _layout(url, tmp_path / "host", monkeypatch)
    assert host.store is not None
    labels = [0, 1] * 5
    model = tmp_path / "model2.keras"
    model.write_bytes(b"model2")
    candidate = Candidate("model2", str(model), 3, 0.7, 1.0, labels, 32, "code")
    split = split_facts(labels)
    shipped: list[str] = []

    def ship(chosen: Candidate, staged: Path) -> ExportCheck:
        shipped.append(chosen.name)
        if len(shipped) == 1:  # meanwhile another host records a decision of its own
            rival = {"history": [{"run_id": "rival", "action": "keep"}]}
            host.store.write_json("production/registry.json", rival, if_match=None)
        staged.mkdir(parents=True)
        (staged / "model.tflite").write_bytes(b"exported once")
        passed = RuntimeCheck("litert", True, max_difference=0.0, other_class=0)
        return ExportCheck(images=len(labels), tolerance=1e-3, runtimes=[passed])

    record = promote(host, candidate, split, Policy(0.0), {"id": "run-1"}, ship=ship)
    assert record.promoted and shipped == ["model2"]
    registry, _ = host.store.read_json("production/registry.json") or ({}, "")
    assert [entry["run_id"] for entry in registry["history"]] == ["rival", "run-1"]
    # The lost turn's archives went with it: only the winning turn's are in the store.
    archived = [key for key in store_env.keys("reship/production/models/")]
    assert archived and all("/0001-model2-" in key for key in archived), archived
    assert store_env.keys("reship/production/export/") == ["reship/production/export/model.tflite"]
    assert not list(host.production_dir.rglob("*.tmp"))


def test_an_entry_s_lease_takes_turns_between_hosts_and_passes_on_when_abandoned(
    store_env: S3Server,
) -> None:
    """The lock of an entry being computed, between hosts that share only the store: a lease
    its holder renews is never taken, however long others wait; a released one is taken at
    once; one whose holder stopped renewing goes, after its expiry, to exactly one waiter;
    one whose holder was a process of this machine that ended, at once."""
    store = ObjectStore.at(f"s3://{store_env.bucket}/leases")
    expiry = 1.2
    a, b, c = (Leases(store, "locks", expiry) for _ in range(3))  # three hosts' views
    assert a.try_take("stage-1", "run-a") and a.try_take("stage-1", "run-a")
    deadline = time.monotonic() + 3 * expiry
    while time.monotonic() < deadline:  # a renews it every expiry / 4
        assert not b.try_take("stage-1", "run-b") and b.is_held("stage-1")
        time.sleep(0.1)
    a.release("stage-1", "run-a")
    assert not b.is_held("stage-1") and b.try_take("stage-1", "run-b")
    b.release("stage-1", "run-b")

    # A lost host's lease: nobody renews it.
    lost = {"holder": "run-x", "process": "elsewhere:4242:1"}
    store.write_json("locks/stage-2.lease", lost, if_match=None)
    assert not b.try_take("stage-2", "run-b") and not c.try_take("stage-2", "run-c")
    time.sleep(expiry + 0.2)
    with ThreadPoolExecutor(2) as pool:
        won = list(pool.map(lambda waiter: waiter[0].try_take("stage-2", waiter[1]),
                            [(b, "run-b"), (c, "run-c")]))  # fmt: skip
    assert sorted(won) == [False, True], won
    winner = b if won[0] else c
    assert winner._read("locks/stage-2.lease")[0]["holder"] in ("run-b", "run-c")  # renewed
    winner.release("stage-2", "run-b" if won[0] else "run-c")
    assert store.read_json("locks/stage-2.lease") is None

    # A process of this machine that has ended holds nothing.
    ended = subprocess.Popen(["true"])
    ended.wait()
    gone = {"holder": "run-y", "process": f"{socket.gethostname()}:{ended.pid}:1"}
    store.write_json("locks/stage-3.lease", gone, if_match=None)
    assert c.try_take("stage-3", "run-c")
    c.release("stage-3", "run-c")

    # Renewals racing releases (one every 0.05 s here): every release removes the lease.
    quick = Leases(store, "locks", 0.2)
    for round_ in range(40):
        assert quick.try_take("stage-4", "run-q")
        time.sleep(0.025 * (round_ % 3))
        quick.release("stage-4", "run-q")
        assert store.read_json("locks/stage-4.lease") is None, round_


def test_a_run_s_stop_request_reaches_its_stages_on_other_hosts(
    store_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose stage failed asks its other stages to stop: a stage on a host that shares
    only the store sees the request at its next look (each epoch, each stage's start), and
    not once the run has ended and withdrawn it."""
    from catdog.errors import RunStopped
    from catdog.mirror import send_stop_request, withdraw_stop_request
    from tasks.caching import check_not_stopped

    url, run_id = f"s3://{store_env.bucket}/stops", "0b0e0f00-0000-4000-8000-000000000001"
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", run_id)  # the run the stages belong to
    run_host = _layout(url, tmp_path / "run-host", monkeypatch)
    worker = _layout(url, tmp_path / "worker", monkeypatch)
    check_not_stopped(worker)
    reason = "the run stopped after train_model[model1] failed"
    send_stop_request(run_host, run_host.stop_request(run_id), reason)
    with pytest.raises(RunStopped, match=re.escape(reason)):
        check_not_stopped(worker)
    assert not worker.stop_request(run_id).exists()  # it came through the store alone
    withdraw_stop_request(run_host, run_host.stop_request(run_id))
    check_not_stopped(worker)


def test_with_no_production_a_new_machine_uses_the_last_run_s_best_from_the_store(
    store_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`predict` and `export` without a production model take the last run's best model: on a
    machine with an empty cache, its training output comes from the store, checked."""
    from catdog.predict import choose_model

    url = f"s3://{store_env.bucket}/no-production"
    run_host = _layout(url, tmp_path / "run-host", monkeypatch)
    trained = run_host.output_dir("train", "train-0123abcd", "model4")
    trained.mkdir(parents=True)
    (trained / "model.keras").write_bytes(b"weights of the best epoch")
    files = {"model.keras": sha256_file_uncached(trained / "model.keras")}
    (trained / RECORD_FILE).write_text(json.dumps({"stage": "train", "files": files}))
    assert push_output(run_host, trained)
    summary = {
        "best_model": "model4",
        "models": {"model4": {"path": str(trained / "model.keras")}},  # the run host's path
        "artifacts_used": [run_host.relative(trained)],
        "data": {"classes": ["cats", "dogs"]},
    }
    run_host.store.pipe("summary.json", summary)

    elsewhere = _layout(url, tmp_path / "elsewhere", monkeypatch)
    choice = choose_model(url, None, None, runtime="keras")
    assert choice.path == elsewhere.root / run_host.relative(trained) / "model.keras"
    assert choice.path.read_bytes() == b"weights of the best epoch"
    assert choice.classes == ["cats", "dogs"] and "last run's best" in choice.origin


def test_a_warm_start_on_a_host_without_production_fetches_it_checked(
    store_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--warm-start production` on a worker that shares only the store: the production model
    it starts from comes from the store, and only as production named it (its hash)."""
    from catdog.errors import ModelError
    from catdog.warm import WarmStart
    from tasks.training import _warm_file

    url = f"s3://{store_env.bucket}/warm"
    store_env.client().put_object(
        Bucket=store_env.bucket, Key="warm/production/models/0000-model4.keras", Body=b"weights"
    )
    worker = _layout(url, tmp_path / "worker", monkeypatch)
    digest = hashlib.sha256(b"weights").hexdigest()
    start = WarmStart("production/models/0000-model4.keras", digest, "production (model4)")
    assert _warm_file(worker, start).read_bytes() == b"weights"
    other = _layout(url, tmp_path / "other-worker", monkeypatch)
    with pytest.raises(ModelError, match="not in the store"):
        _warm_file(other, WarmStart(start.model_file, "0" * 64, start.about))


# ----------------------------------------------------------------------------- through the flow


def _store_run(
    s3: S3Server, data: Path | str, url: str, cache: Path, *extra: str, epochs: int = 1, **env: str
):
    """`python flows/train_flow.py --artifacts <url>` as a user on a host with `cache`."""
    environment = flow_env(cache.with_name(f"{cache.name}-home"), **{**s3.env, **env})
    environment[CACHE_ENV] = str(cache)
    command = [*flow_command(data, url, epochs=epochs), *extra]  # type: ignore[arg-type]
    return subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _copy(cache: Path, s3: S3Server, prefix: str) -> Path:
    """A host's copy of `s3://<bucket>/<prefix>`, in its cache."""
    return cache / "stores" / "s3" / s3.bucket / prefix


def _finished(process: subprocess.Popen) -> tuple[int, str]:
    out, err = process.communicate(timeout=600)
    assert SECRET_KEY not in out + err
    return process.returncode, err


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_a_second_machine_finds_every_stage_cached_in_the_store(
    store_env: S3Server, dataset_zip: Path, tmp_path: Path
) -> None:
    s3 = store_env
    url = f"s3://{s3.bucket}/flow"
    # The data from the store too: an archive in a bucket, fetched again only if its ETag moves.
    s3.client().upload_file(str(dataset_zip), s3.bucket, "data/tiny.zip")
    data = f"s3://{s3.bucket}/data/tiny.zip"
    code, err = _finished(_store_run(s3, data, url, tmp_path / "first"))
    assert code == 0, err[-3000:]
    first = json.loads((_copy(tmp_path / "first", s3, "flow") / "summary.json").read_text())
    assert (first["tasks"]["promote_model"], computed(first) >= ALWAYS_RUN) == ("Completed", True)

    code, err = _finished(_store_run(s3, data, url, tmp_path / "second"))
    assert code == 0, err[-3000:]
    second = json.loads((_copy(tmp_path / "second", s3, "flow") / "summary.json").read_text())
    assert computed(second) == ALWAYS_RUN  # everything else came from the store, checked
    assert second["models"]["model1"]["history"] == first["models"]["model1"]["history"]
    in_store = s3.client().get_object(Bucket=s3.bucket, Key="flow/summary.json")["Body"].read()
    assert json.loads(in_store)["run"]["id"] == second["run"]["id"]
    registry, _ = ObjectStore.at(url).read_json("production/registry.json") or ({}, "")
    assert [entry["action"] for entry in registry["history"]] == ["promote", "keep"]
    assert registry["history"][1]["run_id"] == second["run"]["id"]

    # A third machine, its cache empty: the registry and a prediction, from the store.
    third = {**flow_env(tmp_path / "third-home"), CACHE_ENV: str(tmp_path / "third")}
    catdog = [str(Path(sys.executable).with_name("catdog"))]
    listed = subprocess.run(
        [*catdog, "registry", "list", "--artifacts", url],
        env=third, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert listed.returncode == 0 and "promote" in listed.stdout and "keep" in listed.stdout
    photo = write_image(tmp_path / "photo.jpg", seed=3)
    predicted = subprocess.run(
        [*catdog, "predict", str(photo), "--artifacts", url],
        env=third, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert predicted.stdout.split("\t")[1] in ("cats", "dogs")
    assert "(production, keras)" in predicted.stderr  # the model the store's registry names

    # Other settings, then `cache prune --keep 1` from a machine with an empty cache: what only
    # the earlier runs used leaves the store; what the last run used stays whole there.
    code, err = _finished(_store_run(s3, data, url, tmp_path / "second", epochs=2))
    assert code == 0, err[-3000:]
    last = json.loads((_copy(tmp_path / "second", s3, "flow") / "summary.json").read_text())
    stages = [folder for folder in last["artifacts_used"] if KEY.match(folder.rsplit("/")[-1])]
    stale = {
        folder for folder in first["artifacts_used"] if KEY.match(folder.rsplit("/")[-1])
    } - set(stages)
    # (Each run's report has a folder of its own.)
    assert {folder.rsplit("/", 1)[1].split("-")[0] for folder in stale} == {
        "train",
        "evaluate",
        "report",
    }
    fourth = {**flow_env(tmp_path / "fourth-home"), CACHE_ENV: str(tmp_path / "fourth")}
    prune = [*catdog, "cache", "prune", "--keep", "1", "--artifacts", url]
    planned = subprocess.run([*prune, "--dry-run"], env=fourth, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert all(s3.keys(f"flow/{folder}/") for folder in stale)  # a dry run removes nothing
    pruned = subprocess.run(prune, env=fourth, capture_output=True, text=True, timeout=120)
    assert pruned.returncode == 0, pruned.stderr[-2000:]
    # The training production's model came from stays, for its lineage.
    registry, _ = ObjectStore.at(url).read_json("production/registry.json") or ({}, "")
    lineage = {part for part in Path(registry["source"]).parts if KEY.match(part)}
    for folder in stale:
        if folder.rsplit("/", 1)[1] in lineage:
            assert s3.keys(f"flow/{folder}/") and folder not in planned.stdout + pruned.stdout
            continue
        assert f"would remove {url}/{folder} " in planned.stdout, planned.stdout
        assert f"removed {url}/{folder} " in pruned.stdout, pruned.stdout
        assert not s3.keys(f"flow/{folder}/")
    sealed = [f for f in stages if stage(f.rsplit("/", 1)[1].split("-")[0]).cached]
    assert all(f"flow/{f}/{RECORD_FILE}" in s3.keys(f"flow/{f}/") for f in sealed), sealed
    code, err = _finished(_store_run(s3, data, url, tmp_path / "fifth", epochs=2))
    assert code == 0, err[-3000:]
    again = json.loads((_copy(tmp_path / "fifth", s3, "flow") / "summary.json").read_text())
    assert computed(again) == ALWAYS_RUN  # every kept output came down whole and checked


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_a_store_the_run_cannot_use_stops_it_before_any_work(
    s3: S3Server, dataset_zip: Path, tmp_path: Path
) -> None:
    runs = {
        "refused the credentials": _store_run(
            s3, dataset_zip, f"s3://{s3.bucket}/x", tmp_path / "creds",
            AWS_SECRET_ACCESS_KEY="not-" + SECRET_KEY,
        ),
        "does not exist": _store_run(s3, dataset_zip, "s3://no-such-bucket/x", tmp_path / "bucket"),
        "did not answer": _store_run(
            s3, dataset_zip, f"s3://{s3.bucket}/x", tmp_path / "endpoint",
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
        ),
        # The data in a store it cannot read: named as --data, the artifacts a local folder.
        "the bucket 'no-such-bucket' does not exist": (
            _store_run(s3, "s3://no-such-bucket/photos/", str(tmp_path / "local"),
                       tmp_path / "data-bucket")
        ),
        f"--data s3://{s3.bucket}/empty: no images under this prefix": _store_run(
            s3, f"s3://{s3.bucket}/empty/", str(tmp_path / "local"), tmp_path / "data-empty"
        ),
    }  # fmt: skip
    for expected, process in runs.items():
        code, err = _finished(process)
        assert code == 2, err[-2000:]
        option = "--artifacts" if process.args[-1].startswith("s3://") else "--data"
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {option} s3://")
        assert expected in err
    assert not (tmp_path / "local").exists()
    for cache in ("creds", "bucket", "endpoint", "data-bucket", "data-empty"):
        assert not list((tmp_path / cache).rglob(RECORD_FILE))
    assert not [key for key in s3.keys("x/") if not key.endswith("store-check")]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_a_store_that_stops_mid_run_ends_it_in_one_line_and_later_runs_resume(
    dataset_zip: Path, tmp_path: Path
) -> None:
    """The store goes away while model1 trains: the run ends in one line, after the store's
    retries. Started again, two runs at once from two other hosts take every output the store
    had sealed, go on from model1's last checkpoint there, compute only the rest between them,
    and both complete, their two promotion decisions in the registry."""
    url, epochs = f"s3://{BUCKET}/faults", 40
    with serving(tmp_path / "weed") as s3:  # a server of its own: this test stops it
        run = _store_run(
            s3, dataset_zip, url, tmp_path / "first", "--models", "model1", epochs=epochs
        )
        _checkpoint(s3, "faults/04_models/model1/", run)
        s3.kill()
        code, err = _finished(run)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert re.match(r"error: \w+(\[\w+\])? failed: ", errors[0]), errors
    assert "the store did not answer" in errors[0], errors

    hosts = ("second", "third")
    with serving(tmp_path / "weed", ports=s3.ports) as s3:
        sealed = {
            key.removeprefix("faults/").removesuffix(f"/{RECORD_FILE}")
            for key in s3.keys("faults/")
            if key.endswith(f"/{RECORD_FILE}")
        }
        # Read again now: the run may have checkpointed once more before the store went away.
        checkpoint = _stored_checkpoint(s3, "faults/04_models/model1/")["epoch"]
        runs = [
            _store_run(s3, dataset_zip, url, tmp_path / host, "--models", "model1", epochs=epochs)
            for host in hosts
        ]
        for run in runs:
            code, err = _finished(run)
            assert code == 0, err[-3000:]
        body = s3.client().get_object(Bucket=s3.bucket, Key="faults/production/registry.json")
        registry = json.loads(body["Body"].read())
    summaries = [
        json.loads((_copy(tmp_path / host, s3, "faults") / "summary.json").read_text())
        for host in hosts
    ]
    used = {folder for folder in summaries[0]["artifacts_used"] if not folder.startswith("05_")}
    assert sealed & used and not sealed >= used  # the store stopped half way through
    unsealed = {folder.rsplit("/", 1)[1].split("-")[0] for folder in used - sealed}
    recomputed = [
        {stage_of_task(task.split("[")[0]).name for task in computed(summary) - ALWAYS_RUN}
        for summary in summaries
    ]
    assert "train" in unsealed and set().union(*recomputed) == unsealed
    trained = [
        summary for summary, stages in zip(summaries, recomputed, strict=True) if "train" in stages
    ]
    # The hosts took turns at each entry (its lease in the store): one computed it, the other
    # waited and took what it sealed; model1 went on from the store's checkpoint.
    assert not recomputed[0] & recomputed[1], recomputed
    assert len(trained) == 1
    pulled = re.findall(
        r"going on from epoch (\d+), checkpointed by another host",
        task_run_logs(trained[0]["run"]["id"], "train_model[model1]"),
    )
    assert pulled == [str(checkpoint)], (pulled, checkpoint)
    for summary in summaries:
        assert summary["models"]["model1"]["history"] == trained[0]["models"]["model1"]["history"]
        assert len(summary["models"]["model1"]["history"]["val_accuracy"]) == epochs
    decisions = registry["history"]
    assert {entry["run_id"] for entry in decisions} == {s["run"]["id"] for s in summaries}
    assert [entry["action"] for entry in decisions] == ["promote", "keep"], decisions


def _checkpoint(s3: S3Server, prefix: str, run: subprocess.Popen, *, least_epoch: int = 0) -> dict:
    """The first checkpoint under `prefix` of at least `least_epoch` epochs, once there is one
    (its `epoch`, and `by`: "host:pid")."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert run.poll() is None, "".join(out or "" for out in run.communicate())[-3000:]
        checkpoint = _stored_checkpoint(s3, prefix)
        if checkpoint is not None and checkpoint["epoch"] >= least_epoch:
            return checkpoint
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of {least_epoch}+ epochs under {prefix} in 300 s")


def _stored_checkpoint(s3: S3Server, prefix: str) -> dict | None:
    """The checkpoint record under `prefix` as the store holds it now (None: there is none)."""
    client = s3.client()
    for key in s3.keys(prefix):
        if key.endswith("/checkpoint.json"):
            return json.loads(client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    return None


# ----------------------------------------------------------------------------- a cluster of hosts


@dataclass(frozen=True)
class Hosts:
    address: str  # the Dask scheduler's
    cache: Path  # CATDOG_CACHE_DIR: one path on every host, each host's own folder there
    workers: list[subprocess.Popen]

    @property
    def worker_pids(self) -> set[int]:
        return {worker.pid for worker in self.workers if worker.poll() is None}


@pytest.fixture
def hosts_sharing_nothing(
    s3: S3Server, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hosts]:
    """A Dask scheduler and two workers, each worker on a "host" of its own: it sees none of the
    files the tests wrote (the client's data, cache and Prefect home), only the store, the
    Prefect API and the installed project."""
    from distributed import Client

    reason = namespaces_refused()
    if reason is not None:
        if os.environ.get("CATDOG_REQUIRE_NAMESPACES"):
            pytest.fail(f"mount namespaces are required here (CI) but: {reason}")
        pytest.skip(f"workers on hosts of their own need mount namespaces: {reason}")
    hidden = tmp_path_factory.getbasetemp()
    home = hidden / "host"
    hosts = Hosts(f"tcp://127.0.0.1:{free_port()}", home / "cache", [])
    dask = [sys.executable, "-m", "dask"]
    env = {**flow_env(tmp_path / "home"), **s3.env, **ONE_TF_THREAD}
    env["DASK_DISTRIBUTED__SCHEDULER__UNKNOWN_TASK_DURATION"] = "60s"  # as dask_cluster says
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    with contextlib.ExitStack() as files:
        port = hosts.address.rsplit(":", 1)[1]
        processes = [
            subprocess.Popen(
                [*dask, "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=files.enter_context((logs / "scheduler.log").open("w")),
            )
        ]
        try:
            worker_env = {**env, CACHE_ENV: str(hosts.cache), "PREFECT_HOME": str(home)}
            for i in range(2):
                worker = [*dask, "worker", hosts.address, "--nthreads", "1", "--no-nanny",
                          "--no-dashboard", "--name", f"host-{i}"]  # fmt: skip
                hosts.workers.append(
                    subprocess.Popen(
                        on_a_host_of_its_own(worker, hidden, home),
                        env=worker_env,
                        stdout=subprocess.DEVNULL,
                        stderr=files.enter_context((logs / f"host-{i}.log").open("w")),
                    )
                )
            with Client(hosts.address, timeout=60) as client:
                client.wait_for_workers(2, timeout=120)
                # What the client wrote is not there for them.
                seen = client.run(os.path.exists, str(tmp_path))
                assert list(seen.values()) == [False, False], seen
            yield hosts
        finally:
            for process in [*hosts.workers, *processes]:
                process.kill()
                process.wait()


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_workers_that_share_only_the_store_run_the_flow_and_a_new_client_finds_it_cached(
    store_env: S3Server, hosts_sharing_nothing: Hosts, dataset_zip: Path, tmp_path: Path
) -> None:
    """The flow on workers that share only the store, the data a folder of class folders in it
    too: model1 and model2 start on a worker each, the worker training model1 is killed once
    a checkpoint is in the store and the other goes on from it; then a client with an empty
    cache finds every stage `Cached`."""
    s3, hosts = store_env, hosts_sharing_nothing
    environment = {**flow_env(tmp_path / "client-home"), CACHE_ENV: str(hosts.cache)}
    epochs = 30
    runs = []
    source = tmp_path / "src"  # what dataset_zip holds, as files in the bucket
    for path in sorted(source.rglob("*.jpg")):
        name = path.relative_to(source).as_posix()
        s3.client().upload_file(str(path), s3.bucket, f"cluster-data/tiny_filtered/{name}")
    url = f"s3://{s3.bucket}/cluster"
    command = [
        *flow_command(f"s3://{s3.bucket}/cluster-data/", url, epochs=epochs,  # type: ignore[arg-type]
                      models="model1,model2"),
        *("--train-retries", "1", "--dask-address", hosts.address),
    ]  # fmt: skip
    shutil.rmtree(hosts.cache, ignore_errors=True)
    run = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    killed, epoch = _kill_the_host_training(s3, "cluster/04_models/model1/", hosts, run)
    output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output[-3000:]
    runs.append(json.loads((_copy(hosts.cache, s3, "cluster") / "summary.json").read_text()))

    shutil.rmtree(hosts.cache, ignore_errors=True)  # a new client: its cache empty
    ran = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    runs.append(json.loads((_copy(hosts.cache, s3, "cluster") / "summary.json").read_text()))
    first, second = runs
    images = len(list(source.rglob("*.jpg")))
    assert first["data"]["images"] == images
    # Whichever host built the manifest fetched every image once, from the data's prefix.
    manifest = next(d for d in first["artifacts_used"] if "/manifests/" in f"/{d}/")
    record, _ = ObjectStore.at(url).read_json(f"{manifest}/{RECORD_FILE}") or ({}, "")
    assert record["objects_fetched"] == images
    model1, model2 = (first["models"][name] for name in ("model1", "model2"))
    assert killed != model2["worker"]["pid"]  # they started side by side
    assert model1["worker"]["pid"] == model2["worker"]["pid"]  # the survivor finished model1
    assert len(model1["history"]["val_accuracy"]) == epochs
    logs = task_run_logs(first["run"]["id"], "train_model[model1]")
    pulled = re.findall(r"going on from epoch (\d+), checkpointed by another host", logs)
    assert pulled and epoch <= int(pulled[0]) < epochs, (pulled, epoch)
    assert computed(second) == ALWAYS_RUN
    for name in ("model1", "model2"):
        assert second["models"][name]["history"] == first["models"][name]["history"]
    assert not [key for key in s3.keys("cluster/04_models/") if "/." in key]  # no checkpoints left


def _kill_the_host_training(
    s3: S3Server, prefix: str, hosts: Hosts, run: subprocess.Popen
) -> tuple[int, int]:
    """Kill the worker whose checkpoint is under `prefix` once there is one; returns its pid
    and the epoch of that checkpoint (the worker may send a later one before it dies)."""
    checkpoint = _checkpoint(s3, prefix, run, least_epoch=1)
    pid = int(checkpoint["by"].rsplit(":", 1)[1])
    assert pid in hosts.worker_pids
    os.kill(pid, signal.SIGKILL)
    return pid, checkpoint["epoch"]


def _manifest_record(artifacts: Path, summary: dict) -> dict:
    folder = next(d for d in summary["artifacts_used"] if "/manifests/" in f"/{d}/")
    return json.loads((artifacts / folder / RECORD_FILE).read_text())


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_a_folder_in_the_store_is_mirrored_and_a_run_fetches_only_what_changed(
    store_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--data s3://bucket/photos/`: class folders in a bucket, one folder down as in the real
    archive. The first run fetches every image (and nothing else); an unchanged one fetches
    nothing and is all `Cached`; after two new images, one changed and one removed, a run
    fetches those three objects and counts the change. A host that did not build the
    manifest fetches only the images it reads, checked against their hashes."""
    from catdog.data.store_source import SourceMirror
    from catdog.errors import ImageChangedError
    from catdog.hashing import HashMemo
    from tests.builders import make_dataset
    from tests.conftest import run_flow

    s3 = store_env
    client = s3.client()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    source = make_dataset(tmp_path / "src", train=8, validation=6)
    images = sorted(path.relative_to(source).as_posix() for path in source.rglob("*.jpg"))
    for name in images:
        client.upload_file(str(source / name), s3.bucket, f"photos/tiny_filtered/{name}")
    client.put_object(Bucket=s3.bucket, Key="photos/tiny_filtered/README.txt", Body=b"notes")
    client.put_object(Bucket=s3.bucket, Key="photos/tiny_filtered/train/.DS_Store", Body=b"x")
    data, artifacts = f"s3://{s3.bucket}/photos/", tmp_path / "artifacts"
    mirror = SourceMirror(f"s3://{s3.bucket}/photos/tiny_filtered")

    first = run_flow(data, artifacts)
    record = _manifest_record(artifacts, first)
    assert (record["root"], record["images"]) == (mirror.url, len(images))
    assert record["objects_fetched"] == len(images)
    mirrored = sorted(p.relative_to(mirror.folder).as_posix() for p in mirror.folder.rglob("*.*"))
    assert [name for name in mirrored if not name.startswith(".")] == images

    again = run_flow(data, artifacts)
    assert computed(again) == ALWAYS_RUN

    write_image(tmp_path / "new-1.jpg", 901)
    write_image(tmp_path / "new-2.jpg", 902, bright=True)
    write_image(tmp_path / "changed.jpg", 903)
    for local, name in (
        ("new-1.jpg", "train/cats/cat.100.jpg"),
        ("new-2.jpg", "train/dogs/dog.100.jpg"),
        ("changed.jpg", images[0]),
    ):
        client.upload_file(str(tmp_path / local), s3.bucket, f"photos/tiny_filtered/{name}")
    client.delete_object(Bucket=s3.bucket, Key=f"photos/tiny_filtered/{images[-1]}")
    third = run_flow(data, artifacts)
    assert third["increment"]["images"] == {"new": 2, "changed": 1, "moved": 0, "removed": 1}
    assert _manifest_record(artifacts, third)["objects_fetched"] == 3
    assert not (mirror.folder / images[-1]).exists()
    assert (mirror.folder / images[0]).read_bytes() == (tmp_path / "changed.jpg").read_bytes()

    # Another host (an empty cache): only the images asked for come, checked.
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "worker-cache"))
    worker = SourceMirror(mirror.url)
    wanted = [(name, sha256_file_uncached(mirror.folder / name)) for name in images[1:3]]
    memo = HashMemo(tmp_path / "worker-memo.json")
    assert (worker.ensure(wanted, memo), worker.ensure(wanted, memo)) == (2, 0)
    assert sorted(p.name for p in worker.folder.rglob("*.jpg")) == sorted(
        Path(name).name for name in images[1:3]
    )
    client.upload_file(str(tmp_path / "new-1.jpg"), s3.bucket, f"photos/tiny_filtered/{images[3]}")
    with pytest.raises(ImageChangedError, match="changed in the store"):
        worker.ensure([(images[3], sha256_file_uncached(mirror.folder / images[3]))], memo)


def test_a_watch_sees_a_folder_in_the_store_change_by_its_listing(
    store_env: S3Server, tmp_path: Path
) -> None:
    """`catdog watch --data s3://bucket/photos/` looks at the listing alone (ETags and sizes):
    the same twice, then the images added, removed and changed."""
    from catdog.data.watch import compare, snapshot

    client = store_env.client()
    for seed, name in enumerate(("cats/a.jpg", "cats/b.jpg", "dogs/c.jpg", "dogs/d.jpg")):
        write_image(tmp_path / "image.jpg", seed, bright=name.startswith("dogs"))
        client.upload_file(str(tmp_path / "image.jpg"), store_env.bucket, f"watched/{name}")
    data = f"s3://{store_env.bucket}/watched/"
    first = snapshot(data)
    assert snapshot(data) == first and len(first.files or {}) == 4
    write_image(tmp_path / "image.jpg", 10)
    client.upload_file(str(tmp_path / "image.jpg"), store_env.bucket, "watched/cats/a.jpg")
    client.upload_file(str(tmp_path / "image.jpg"), store_env.bucket, "watched/cats/e.jpg")
    client.delete_object(Bucket=store_env.bucket, Key="watched/dogs/d.jpg")
    change = compare(first, snapshot(data))
    assert (change.added, change.removed, change.changed) == (1, 1, 1)


def test_a_folder_in_the_store_without_a_dataset_layout_is_refused_by_name(
    store_env: S3Server, tmp_path: Path
) -> None:
    """The layout is judged from the listing, as on disk, before anything is fetched."""
    from catdog.checks import check_data_source
    from catdog.errors import DataError

    client = store_env.client()
    write_image(tmp_path / "image.jpg", 1)
    for name in (
        "flat/a.jpg",
        "flat/b.jpg",
        "two/x/cats/a.jpg",
        "two/x/dogs/b.jpg",
        "two/y/cats/c.jpg",
        "two/y/dogs/d.jpg",
    ):
        client.upload_file(str(tmp_path / "image.jpg"), store_env.bucket, name)
    url = f"s3://{store_env.bucket}"
    with pytest.raises(DataError, match=f"^--data {re.escape(url)}/flat/ has no class folders"):
        check_data_source(f"{url}/flat/")
    with pytest.raises(DataError, match=f"^--data {re.escape(url)}/two/ holds several datasets"):
        check_data_source(f"{url}/two/")


@pytest.mark.slow
def test_a_third_machine_rolls_production_back_in_the_store(
    store_env: S3Server, tmp_path: Path
) -> None:
    """`catdog registry rollback --artifacts s3://...` from a process whose cache is empty:
    the store's registry records the rollback and production is the model before, for the
    next machine that looks."""
    from tests.test_prune import _promotions

    folder = tmp_path / "made-elsewhere"
    stems = _promotions(folder, 2)
    client = store_env.client()
    for path in sorted((folder / "production").rglob("*")):
        if path.is_file():
            key = f"rollback/{path.relative_to(folder).as_posix()}"
            client.upload_file(str(path), store_env.bucket, key)
    url = f"s3://{store_env.bucket}/rollback"
    catdog = [str(Path(sys.executable).with_name("catdog"))]

    def third(name: str, *args: str) -> subprocess.CompletedProcess:
        env = {**flow_env(tmp_path / f"{name}-home"), **store_env.env}
        env[CACHE_ENV] = str(tmp_path / name)
        return subprocess.run([*catdog, "registry", *args, "--artifacts", url], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    rolled = third("third", "rollback")
    assert rolled.returncode == 0, rolled.stderr[-2000:]
    assert "rolled back from model1 (entry 2) to model1 (entry 0)" in rolled.stdout
    registry, _ = ObjectStore.at(url).read_json("production/registry.json") or ({}, "")
    assert [entry["action"] for entry in registry["history"]][-1] == "rollback"
    assert registry["archive"] == f"production/models/{stems[0]}.keras"
    listed = third("fourth", "list")
    assert listed.returncode == 0 and "rollback" in listed.stdout, listed.stderr[-2000:]
