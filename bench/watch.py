"""What one look of `catdog watch` costs: a folder of 30,000 real images, the real zip, a URL.

Each source is looked at in a process of its own (as the watch is), which reports the seconds of
each look, its peak memory and whether TensorFlow, NumPy or Prefect were imported. The folder is
the real dataset ten times over (hard links), then 5% more images, to time the look that finds
them. Last, the memory of a watch process that has imported what an announcement needs.

    .venv/bin/python bench/watch.py --data ../shared/data/cats_and_dogs_filtered.zip
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from statistics import median
from threading import Thread
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH,
    REPO,
    SHARED,
    bf16_flags,
    command_line,
    environment_markdown,
    fmt,
    now,
    run_facts,
    table,
    write_section,
)

LOOKS = 5
# A process's own peak memory: VmHWM starts anew at exec, where ru_maxrss keeps the parent's
# high-water mark from before it.
PEAK = (
    "def peak_mib():\n"
    "        return next(int(l.split()[1]) / 1024 for l in open('/proc/self/status')"
    " if l.startswith('VmHWM:'))"
)
PROBE = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from catdog.data.watch import compare, snapshot
    {peak}
    seconds, first = [], None
    for _ in range({looks}):
        start = time.perf_counter()
        look = snapshot({source!r})
        seconds.append(time.perf_counter() - start)
        first = first or look
    grown = {{}}
    if {grow}:  # the dataset grows by this share (new names, hard links), then one more look
        images = sorted(Path({source!r}).rglob("*.jpg"))
        for path in images[: int(len(images) * {grow})]:
            os.link(path, path.with_name(f"new.{{path.name}}"))
        start = time.perf_counter()
        after = snapshot({source!r})
        grown["look_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        change = compare(first, after)
        grown["compare_seconds"] = time.perf_counter() - start
        grown["added"] = change.added
    print(json.dumps({{
        "seconds": seconds,
        "grown": grown,
        "images": len(look.files) if look.files is not None else None,
        "rss_mib": peak_mib(),
        "heavy": [m for m in ("tensorflow", "numpy", "prefect") if m in sys.modules],
    }}))
    """
)
ANNOUNCER = textwrap.dedent(
    """
    import json, sys
    import flows.watch
    from prefect import get_client  # the API check at start
    from prefect.events.clients import get_events_client  # the announcement
    from catdog.data.watch import snapshot
    {peak}
    announced, current = snapshot({source!r}), snapshot({source!r})  # as the watch holds them
    print(json.dumps({{
        "rss_mib": peak_mib(),
        "heavy": [m for m in ("tensorflow", "numpy", "prefect") if m in sys.modules],
    }}))
    """
)


def _run(code: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return dict(json.loads(result.stdout))


def look(source: str, grow: float = 0.0) -> dict[str, Any]:
    return _run(PROBE.format(looks=LOOKS, source=source, grow=grow, peak=PEAK))


def enlarged(archive: Path, folder: Path, copies: int) -> int:
    """The archive's images extracted once, then hard-linked `copies` times in all, each copy
    under its own names in the same class folders (as a dataset that grew would be)."""
    originals = folder.parent / "originals"
    with zipfile.ZipFile(archive) as handle:
        members = [n for n in handle.namelist() if n.endswith(".jpg")]
        handle.extractall(originals, members)
    count = 0
    for member in members:
        source = originals / member
        parts = Path(member).parts  # root/split/class/name.jpg
        for copy in range(copies):
            target = folder / parts[-3] / parts[-2] / f"{copy}.{parts[-1]}"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, target)
            count += 1
    return count


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "cats_and_dogs_filtered.zip")
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args()

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        folder = work / "pets"
        images = enlarged(args.data, folder, args.copies)
        results[f"folder, {images:,} images"] = look(str(folder), grow=0.05)
        results["the real zip"] = look(str(args.data))
        site = work / "site"
        site.mkdir()
        os.link(args.data, site / "pets.zip")
        handler = partial(QuietHandler, directory=str(site))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/pets.zip"
            results["a URL on 127.0.0.1 (HEAD)"] = look(url)
        finally:
            server.shutdown()
        announcer = _run(ANNOUNCER.format(source=str(folder), peak=PEAK))

    rows = [
        [
            source,
            fmt(median(result["seconds"]), 3, " s"),
            fmt(max(result["seconds"]), 3, " s"),
            fmt(result["rss_mib"], 0, " MiB"),
            ", ".join(result["heavy"]) or "none",
        ]
        for source, result in results.items()
    ]
    grown = results[f"folder, {images:,} images"]["grown"]
    heavy = ", ".join(announcer["heavy"])
    body = "\n".join(
        [
            f"## The watch: one look at a source (watch, {now()})",
            "",
            f"`{command_line()}`",
            "",
            environment_markdown({"CPU flags": bf16_flags(), "commit": run_facts()["commit"]}),
            "",
            table(
                [
                    "source",
                    f"one look, median of {LOOKS}",
                    "slowest look",
                    "peak memory of the process",
                    "heavy imports",
                ],
                rows,
            ),
            "",
            f"After {grown['added']:,} images were added (5%), the look that found them took "
            f"{fmt(grown['look_seconds'], 3, ' s')} and telling what changed (added, removed, "
            f"changed, by name) {fmt(grown['compare_seconds'], 3, ' s')}. The whole watch process, "
            "with Prefect's client and events client imported (the API check at start, the "
            "announcements) and two listings of the folder held (the announced one and the "
            f"current one): {fmt(announcer['rss_mib'], 0, ' MiB')} peak memory "
            f"({fmt(announcer['rss_mib'] * 1.048576, 0, ' MB')}; imports: {heavy}). Peak memory "
            "is the process's own high-water mark (VmHWM). "
            "The "
            "folder's files are hard links to the real images (the listing reads each file's "
            "size and time, not its content); the page cache holds the folder's entries, as it "
            "does for a watch that looks every few minutes.",
        ]
    )
    write_section(args.out, "watch", body, f"The watch: one look at a source (watch, {now()})")
    raw = {"looks": results, "announcer": announcer}
    (args.out.parent / "RESULTS.watch.json").write_text(json.dumps(raw, indent=2) + "\n")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
