"""`catdog watch`: announce a data source's settled changes as Prefect events.

Each look (catdog/data/watch.py) lists a folder or a zip, or asks a URL with a HEAD; it never
reads an image or imports TensorFlow. A settled change goes out as one `catdog.data.changed`
event whose resource names the source; a deployment served with `catdog serve --on-data-change`
(or prefect.yaml's trigger) starts a training run on it, and the run's page in the UI links
back to the event that started it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from catdog.data.watch import (
    EVENT,
    Change,
    Snapshot,
    SourceUnavailable,
    Watch,
    snapshot,
    source_resource,
)
from catdog.errors import DataError
from flows.console import one_line


def announce(change: Change) -> str:
    """Emit `change` to the Prefect API as a `catdog.data.changed` event; its id."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    event = Event(event=EVENT, resource=source_resource(change.source), payload=asdict(change))

    async def send() -> None:
        async with get_events_client(reconnection_attempts=2) as client:
            await client.emit(event)

    asyncio.run(send())
    return str(event.id)


def watch(
    data: str,
    state_file: Path,
    *,
    every: float,
    settle: float,
    looks: int | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Look at `data` every `every` seconds (`looks` times, or until stopped) and announce each
    change once it has stayed unchanged for `settle` seconds.

    A look that fails (the server does not answer, the folder is being remounted) is said and
    tried again at the next one; so is an announcement the API did not take, which is made
    again at the next look, so a change is never lost. The first look must succeed but for a
    server that does not answer: a source that cannot be watched stops here (`DataError`).
    """
    state = Watch.load(state_file, settle)
    if state.announced and state.announced.source == data:
        say(f"watching {data} from the revision announced last ({state.announced.revision[:12]})")
    done = 0
    while True:
        try:
            current = snapshot(data)
        except (SourceUnavailable, DataError) as problem:
            if done == 0 and isinstance(problem, DataError):
                raise
            say(f"warning: could not look at {data} ({problem}); trying again in {every:g} s")
        else:
            first = state.announced is None
            change = state.look(current, time.time())
            if first:
                listed = f"{len(current.files)} images, " if current.files is not None else ""
                say(f"watching {data}: {listed}revision {current.revision[:12]}")
            if change:
                _announce(state, current, change, say)
        done += 1
        if looks is not None and done >= looks:
            return
        time.sleep(state.next_look(time.time(), every))


def _announce(state: Watch, current: Snapshot, change: Change, say: Callable[[str], None]) -> None:
    try:
        event_id = announce(change)
    except Exception as error:  # the API is away: the change stays pending, said again next look
        message = one_line(error) or type(error).__name__
        say(f"warning: could not announce {change.describe()} ({message}); trying again")
        return
    state.commit(current)
    say(f"{EVENT} {event_id}: {change.describe()}")
