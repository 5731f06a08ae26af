"""Artifacts in an object store (`--artifacts s3://bucket/prefix`), against a real S3 server
(SeaweedFS on 127.0.0.1, see tests/s3_server.py): the conditional writes S3 promises, sealed
outputs going up whole and coming down checked, a run from a second machine's empty cache all
`Cached`, and a store the run cannot use stopping it before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from catdog.hashing import sha256_file_uncached
from catdog.layout import RECORD_FILE, Layout
from catdog.mirror import fetch_output, production_turn, push_output
from catdog.store import CACHE_ENV, ObjectStore, StoreConflict
from tests.builders import write_image
from tests.conftest import ALWAYS_RUN, computed, flow_command, flow_env, free_port
from tests.s3_server import SECRET_KEY, S3Server, serving


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
    with production_turn(host):
        decide("model2")
    registry, _ = store.read_json("production/registry.json") or ({}, "")
    assert [entry["model"] for entry in registry["history"]] == ["model1", "model2"]
    assert "turns/production/models/0001-model2.keras" in store_env.keys("turns/")


# ----------------------------------------------------------------------------- through the flow


def _store_run(s3: S3Server, data: Path, url: str, cache: Path, **env: str):
    """`python flows/train_flow.py --artifacts <url>` as a user on a host with `cache`."""
    environment = flow_env(cache.with_name(f"{cache.name}-home"), **{**s3.env, **env})
    environment[CACHE_ENV] = str(cache)
    command = flow_command(data, url, epochs=1)  # type: ignore[arg-type]  (a URL, not a path)
    return subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


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
    code, err = _finished(_store_run(s3, dataset_zip, url, tmp_path / "first"))
    assert code == 0, err[-3000:]
    first = json.loads((tmp_path / "first/stores/s3" / s3.bucket / "flow/summary.json").read_text())
    assert (first["tasks"]["promote_model"], computed(first) >= ALWAYS_RUN) == ("Completed", True)

    code, err = _finished(_store_run(s3, dataset_zip, url, tmp_path / "second"))
    assert code == 0, err[-3000:]
    copy = tmp_path / "second/stores/s3" / s3.bucket / "flow"
    second = json.loads((copy / "summary.json").read_text())
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
    }  # fmt: skip
    for expected, process in runs.items():
        code, err = _finished(process)
        assert code == 2, err[-2000:]
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: --artifacts s3://")
        assert expected in err
    for cache in ("creds", "bucket", "endpoint"):
        assert not list((tmp_path / cache).rglob(RECORD_FILE))
    assert not [key for key in s3.keys("x/") if not key.endswith("store-check")]
