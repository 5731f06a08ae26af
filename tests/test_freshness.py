"""A dataset URL is asked, each run, whether its archive changed: a real HTTP server on
127.0.0.1, the real flow under Prefect's engine."""

from __future__ import annotations

import functools
import json
import shutil

import pytest

from catdog.data import freshness
from catdog.data.freshness import SourceUnavailable, check_url, probe, remember
from catdog.errors import DataError
from tests.conftest import ALWAYS_RUN, computed, publish, run_flow

# ----------------------------------------------------------------------------- the library


def test_probe_reads_the_validators_without_a_body(site, tmp_path):
    publish(site.folder, tmp_path, "a.zip", 4, 1)
    revision = json.loads(probe(site.url("a.zip")))
    assert revision["last_modified"] and int(revision["length"]) > 0
    assert site.requests == ["HEAD"]


@pytest.mark.parametrize(("mode", "message"), [("busy", "HTTP 503"), ("html", "HTML page")])
def test_a_server_that_cannot_answer_is_unavailable(site, mode, message):
    site.mode = mode
    with pytest.raises(SourceUnavailable, match=message):
        probe(site.url("a.zip"), attempts=2, backoff=0.01)
    assert site.requests == ["HEAD"] * (2 if mode == "busy" else 1)


def test_offline_without_an_earlier_download_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"--offline: no earlier download of http://x/a\.zip"):
        check_url("http://x/a.zip", tmp_path / "sources.json", offline=True)


def test_unreachable_server_falls_back_to_the_last_good_download(tmp_path, monkeypatch):
    # Its three tries as always, without the seconds of backoff between them.
    monkeypatch.setattr(freshness, "probe", functools.partial(probe, backoff=0.01))
    memo = tmp_path / "sources.json"
    url = "http://127.0.0.1:9/a.zip"  # the discard port: nothing listens
    remember(memo, url, '{"etag": "v1"}', "abc")
    check = check_url(url, memo, offline=False)
    assert check.revision == '{"etag": "v1"}' and check.fresh is False
    assert check.warning.startswith(f"could not ask {url} whether the dataset changed")


# ----------------------------------------------------------------------------- the flow


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_retraining_follows_the_archive_at_a_url(site, tmp_path):

    folder = site.folder
    url = site.url("pets.zip")
    artifacts = tmp_path / "artifacts"
    publish(folder, tmp_path, "pets.zip", 6, 1)
    first = run_flow(url, artifacts)
    assert first["data"]["counts"]["train"] == {"cats": 6, "dogs": 6}
    assert first["data"]["source_fresh"] is True

    publish(folder, tmp_path, "pets.zip", 9, 2)  # a new archive at the same URL
    site.requests.clear()
    second = run_flow(url, artifacts)
    assert site.requests.count("GET") == 1
    assert second["data"]["counts"]["train"] == {"cats": 9, "dogs": 9}
    assert set(second["tasks"].values()) == {"Completed"}  # every stage after the download too

    site.requests.clear()
    third = run_flow(url, artifacts)
    assert site.requests == ["HEAD"]  # no body transferred
    assert computed(third) == ALWAYS_RUN
    assert third["data"]["counts"] == second["data"]["counts"]

    for mode, reason in (("busy", "HTTP 503"), ("html", "HTML page")):
        site.mode = mode
        stale = run_flow(url, artifacts)
        assert stale["data"]["source_fresh"] is False
        assert reason in stale["data"]["source_warning"]
        assert computed(stale) == ALWAYS_RUN
        assert stale["data"]["counts"] == second["data"]["counts"]  # the last good archive

    site.requests.clear()
    offline = run_flow(url, artifacts, offline=True)
    assert site.requests == []
    assert offline["data"]["source_fresh"] is False and computed(offline) == ALWAYS_RUN


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_two_urls_serving_the_same_bytes_share_every_stage_after_the_download(site, tmp_path):

    folder = site.folder
    archive = publish(folder, tmp_path, "pets.zip", 6, 1)
    shutil.copy(archive, folder / "mirror.zip")
    artifacts = tmp_path / "artifacts"
    run_flow(site.url("pets.zip"), artifacts)
    mirror = run_flow(site.url("mirror.zip"), artifacts)
    assert computed(mirror) == {"download_dataset"} | ALWAYS_RUN
