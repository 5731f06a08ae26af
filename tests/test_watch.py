"""The data watch: what a look at a folder, a zip or a URL sees, how a burst of changes settles
into one announcement, and the event it sends to a real Prefect API. The served deployment it
starts is in tests/test_server.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from catdog.data.watch import Watch, compare, snapshot, source_resource, state_file_for
from tests.conftest import REPO, make_dataset, publish, write_image, zip_folder
from tests.http_site import Site


def test_a_folder_look_lists_images_and_tells_what_was_added_removed_changed_and_moved(
    tmp_path: Path,
) -> None:
    folder = make_dataset(tmp_path / "pets", train=3, validation=2)
    (folder / "train" / "cats" / ".DS_Store").write_bytes(b"litter")
    (folder / "train" / "cats" / "notes.txt").write_text("not an image")
    before = snapshot(str(folder))
    assert before.files is not None and len(before.files) == 10
    assert snapshot(str(folder)) == before  # nothing read differently on a second look

    write_image(folder / "train" / "cats" / "cats.new.jpg", 1)
    (folder / "validation" / "dogs" / "dogs.3.jpg").unlink()
    write_image(folder / "train" / "dogs" / "dogs.0.jpg", 99)  # same name, new content
    os.utime(folder / "train" / "dogs" / "dogs.0.jpg", ns=(1, 10**18))
    shutil.move(folder / "train" / "cats" / "cats.0.jpg", folder / "train" / "dogs" / "cats.0.jpg")
    change = compare(before, snapshot(str(folder)))
    assert (change.added, change.removed, change.changed) == (2, 2, 1)
    assert change.examples == {
        "added": ["train/cats/cats.new.jpg", "train/dogs/cats.0.jpg"],
        "removed": ["train/cats/cats.0.jpg", "validation/dogs/dogs.3.jpg"],
        "changed": ["train/dogs/dogs.0.jpg"],
    }
    assert change.old_revision == before.revision != change.new_revision
    assert "2 image(s) added, 2 removed, 1 changed" in change.describe()


def test_a_zip_look_reads_only_its_directory(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "pets", train=2, validation=1)
    archive = zip_folder(folder, tmp_path / "pets.zip", prefix="pets/")
    before = snapshot(str(archive))
    write_image(folder / "train" / "cats" / "cats.9.jpg", 5)
    zip_folder(folder, archive, prefix="pets/")
    change = compare(before, snapshot(str(archive)))
    assert (change.added, change.removed, change.changed) == (1, 0, 0)
    assert change.examples["added"] == ["pets/train/cats/cats.9.jpg"]


def test_a_url_look_is_one_head_request(site: Site, tmp_path: Path) -> None:
    publish(site.folder, tmp_path, "pets.zip", 3, 1)
    site.requests.clear()
    before = snapshot(site.url("pets.zip"))
    assert site.requests == ["HEAD"] and before.files is None
    publish(site.folder, tmp_path, "pets.zip", 4, 2)
    change = compare(before, snapshot(site.url("pets.zip")))
    assert change.new_revision != change.old_revision and change.added is None
    assert site.requests == ["HEAD", "HEAD"]  # no body, ever


def test_a_burst_of_changes_is_announced_once_after_it_settles(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "pets", train=2, validation=1)
    state = tmp_path / "state.json"
    watch = Watch.load(state, settle=30)
    assert watch.look(snapshot(str(folder)), now=0) is None  # the first look is the baseline
    assert watch.look(snapshot(str(folder)), now=10) is None  # nothing changed
    for second in range(20, 30):  # ten quick changes, one a second
        write_image(folder / "train" / "cats" / f"new.{second}.jpg", second)
        assert watch.look(snapshot(str(folder)), now=second) is None
    assert watch.look(snapshot(str(folder)), now=50) is None  # 21 s since the last change
    current = snapshot(str(folder))
    change = watch.look(current, now=60)
    assert change is not None and change.added == 10
    watch.commit(current)
    assert watch.look(snapshot(str(folder)), now=100) is None  # announced once

    # A restarted watch neither repeats that change nor misses one made while it was down.
    write_image(folder / "train" / "dogs" / "new.jpg", 77)
    restarted = Watch.load(state, settle=0)
    change = restarted.look(snapshot(str(folder)), now=200)
    assert change is not None and (change.added, change.removed) == (1, 0)


def test_a_change_undone_before_it_settles_is_not_announced(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "pets", train=2, validation=1)
    watch = Watch.load(tmp_path / "state.json", settle=30)
    watch.look(snapshot(str(folder)), now=0)
    extra = write_image(folder / "train" / "cats" / "extra.jpg", 3)
    assert watch.look(snapshot(str(folder)), now=10) is None
    extra.unlink()
    assert watch.look(snapshot(str(folder)), now=50) is None
    assert watch.look(snapshot(str(folder)), now=90) is None


def test_the_watch_state_lives_under_the_artifacts_folder(tmp_path: Path) -> None:
    state = state_file_for(tmp_path / "artifacts", "/data/pets")
    assert state.parent == tmp_path / "artifacts" / "watch"
    assert state != state_file_for(tmp_path / "artifacts", "/data/other")


def test_an_announcement_is_a_prefect_event_about_the_source(
    prefect_api: None, tmp_path: Path
) -> None:
    """Through the real API: the watch loop sends one `catdog.data.changed` event for a settled
    change, with its resource naming the source, and nothing for an unchanged look."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from flows.watch import watch

    folder = str(make_dataset(tmp_path / "pets", train=2, validation=1))
    state = tmp_path / "state.json"
    said: list[str] = []
    watch(folder, state, every=0.01, settle=0, looks=2, say=said.append)
    write_image(Path(folder) / "train" / "cats" / "new.jpg", 4)
    watch(folder, state, every=0.01, settle=0, looks=3, say=said.append)
    announced = [line for line in said if line.startswith("catdog.data.changed")]
    assert len(announced) == 1 and "1 image(s) added" in announced[0], said

    resource = source_resource(folder)

    async def events() -> list:
        async with get_client() as client:
            page = await client.request(
                "POST",
                "/events/filter",
                json={
                    "filter": EventFilter(
                        event=EventNameFilter(name=["catdog.data.changed"]),
                        resource=EventResourceFilter(id=[resource["prefect.resource.id"]]),
                    ).model_dump(mode="json")
                },
            )
            return page.json()["events"]

    found: list = []
    for _ in range(40):  # the events pipeline writes them a moment later
        found = asyncio.run(events())
        if found:
            break
        asyncio.run(asyncio.sleep(0.25))
    [event] = found
    assert event["resource"]["catdog.source"] == folder
    assert event["payload"]["added"] == 1
    assert event["payload"]["examples"] == {"added": ["train/cats/new.jpg"]}
    assert event["id"] in announced[0]


@pytest.mark.slow
def test_a_look_at_30000_images_is_cheap_and_imports_no_tensorflow(tmp_path: Path) -> None:
    """The acceptance bound of a watch's look: under 0.5 s and 100 MB of memory for a folder of
    30,000 images, in a process of its own that imports neither TensorFlow nor NumPy."""
    folder = tmp_path / "big"
    for name in ("cats", "dogs"):
        (folder / name).mkdir(parents=True)
        for index in range(15_000):
            (folder / name / f"{name}.{index}.jpg").write_bytes(b"\xff\xd8")
    probe = textwrap.dedent(
        f"""
        import json, sys, time
        from catdog.data.watch import snapshot

        def peak_mib():  # this process's own peak (ru_maxrss would count the parent's at fork)
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        start = time.perf_counter()
        look = snapshot({str(folder)!r})
        seconds = time.perf_counter() - start
        print(json.dumps({{
            "seconds": seconds,
            "images": len(look.files),
            "rss_mb": peak_mib(),
            "heavy": [m for m in ("tensorflow", "numpy", "prefect") if m in sys.modules],
        }}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    cost = json.loads(result.stdout)
    assert cost["images"] == 30_000 and cost["heavy"] == []
    assert cost["seconds"] < 0.5 and cost["rss_mb"] < 100, cost


def test_the_look_after_a_change_comes_when_it_has_settled(tmp_path: Path) -> None:
    """A change is announced within --settle plus one --every of being made, not two looks
    later: the look after the one that saw it comes when it settles."""
    folder = make_dataset(tmp_path / "pets", train=2, validation=1)
    watch = Watch.load(tmp_path / "state.json", settle=60)
    watch.look(snapshot(str(folder)), now=0)
    assert watch.next_look(now=0, every=300) == 300
    write_image(folder / "train" / "cats" / "new.jpg", 8)
    assert watch.look(snapshot(str(folder)), now=10) is None
    assert watch.next_look(now=10, every=300) == 60
    assert watch.look(snapshot(str(folder)), now=70) is not None


def test_a_url_that_gives_no_validators_cannot_be_watched(site: Site, tmp_path: Path) -> None:
    from catdog.errors import DataError
    from tests.http_site import answer

    publish(site.folder, tmp_path, "pets.zip", 3, 1)
    site.script = [answer(405, b"")]  # no HEAD: nothing to tell a change by without the body
    with pytest.raises(DataError, match="no ETag, Last-Modified or Content-Length"):
        snapshot(site.url("pets.zip"))


def test_a_state_file_that_cannot_be_read_makes_the_next_look_the_baseline(
    tmp_path: Path,
) -> None:
    folder = make_dataset(tmp_path / "pets", train=2, validation=1)
    state = tmp_path / "state.json"
    state.write_text('{"announced": {"unknown": 1}}')
    watch = Watch.load(state, settle=0)
    assert watch.look(snapshot(str(folder)), now=0) is None  # a baseline, not a crash
    assert json.loads(state.read_text())["announced"]["source"] == str(folder)
