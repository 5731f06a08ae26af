"""Shared pieces of the benchmark scripts: measured subprocesses, machine facts, Markdown output.

Nothing here imports TensorFlow: the parent process stays small and quiet while it measures.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from statistics import median
from typing import Any

from catdog import catalog
from catdog.data.manifest import build_manifest
from catdog.data.records import Manifest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SHARED = REPO.parent / "shared"
SNAPSHOT_PARTS = ("catdog", "tasks", "flows")
GIB = 1024**3
MIB = 1024**2


@contextlib.contextmanager
def extracted_dataset(archive: Path) -> Iterator[Manifest]:
    """The dataset archive unpacked into a temporary folder, as its manifest (every usable
    image, paths relative to `manifest.root`); the folder goes when the block ends."""
    with tempfile.TemporaryDirectory() as work:
        with zipfile.ZipFile(archive) as handle:
            handle.extractall(work)
        yield build_manifest(Path(work))


def log(message: str) -> None:
    """Progress line on stderr, with the time of day."""
    print(f"[bench {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- subprocesses


@dataclass
class Run:
    """One measured subprocess: its wall time, exit status and peak memory."""

    command: list[str]
    log_path: str
    wall_seconds: float = 0.0
    returncode: int | None = None
    max_rss_bytes: int = 0  # ru_maxrss of the child (largest single process of its tree)
    tree_rss_bytes: int = 0  # sampled peak of the summed RSS of every process it started
    cpu_seconds: float = 0.0  # user + system CPU time of the child and its descendants
    others_cores: float | None = None  # average cores busy with other processes meanwhile
    timed_out: bool = False
    error: str | None = None

    @property
    def peak_bytes(self) -> int:
        """The larger of the two memory measures."""
        return max(self.max_rss_bytes, self.tree_rss_bytes)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "peak_bytes": self.peak_bytes}


def _session_rss(session: int) -> int:
    """Summed RSS of every process in `session` (our child called setsid)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read().decode(errors="replace")
            # Fields after the parenthesised command name; the 4th is the session id.
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) != session:
                continue
            with open(f"/proc/{entry}/statm", "rb") as handle:
                total += int(handle.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
    return total


def _busy_cpu_seconds() -> float | None:
    """Machine-wide busy CPU seconds so far (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def measure(
    command: list[str],
    log_path: Path,
    *,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    sample_every: float = 1.0,
    cwd: Path = REPO,
) -> Run:
    """Run `command` in a new session; wall time from here, peak memory from wait4 and /proc.

    Output goes to `log_path`. A command that outlives `timeout` seconds is killed with its
    whole process group and recorded as timed out. It runs in `cwd` (the checkout: where a
    snapshot's code must win, another folder, as `python -m` puts the folder first).
    """
    run = Run(command=[str(part) for part in command], log_path=str(log_path))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    busy_before = _busy_cpu_seconds()
    with open(log_path, "wb") as out:
        started = time.perf_counter()
        try:
            proc = subprocess.Popen(
                run.command,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        except OSError as exc:
            run.error = f"could not start: {exc}"
            return run
        done = threading.Event()
        peak = [0]

        def sample() -> None:
            while not done.wait(sample_every):
                peak[0] = max(peak[0], _session_rss(proc.pid))

        def kill() -> None:
            run.timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            run.wall_seconds = time.perf_counter() - started
            done.set()
            if timer:
                timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.join()
        # Linux reports ru_maxrss in KiB.
        run.max_rss_bytes = int(usage.ru_maxrss) * 1024
        run.tree_rss_bytes = peak[0]
        run.returncode = proc.returncode
        run.cpu_seconds = usage.ru_utime + usage.ru_stime
    busy_after = _busy_cpu_seconds()
    if busy_before is not None and busy_after is not None and run.wall_seconds > 0:
        others = busy_after - busy_before - run.cpu_seconds
        run.others_cores = max(0.0, others / run.wall_seconds)
    if run.timed_out:
        run.error = f"timed out after {timeout:.0f} s"
    elif run.returncode != 0:
        run.error = f"exit code {run.returncode}: {last_lines(log_path)}"
    return run


def keep_logs(work: Path, label: str) -> Path | None:
    """Copy every *.log / log.txt of a work folder to a temp folder that outlives it."""
    dest = Path(tempfile.gettempdir()) / "catdog-bench-logs" / f"{label}-{time.strftime('%H%M%S')}"
    try:
        for path in sorted(work.rglob("*")):
            if path.is_file() and (path.suffix == ".log" or path.name == "log.txt"):
                target = dest / path.relative_to(work)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
    except OSError:
        return None
    return dest


def feature_seconds(log_path: Path) -> float | None:
    """Seconds of catdog's extract_features task, from its log line ('... in 85 s')."""
    import re

    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    found = re.findall(r"base features: .* in (\d+(?:\.\d+)?) s", text)
    return float(found[-1]) if found else None


def last_lines(path: Path, count: int = 3) -> str:
    """The last non-empty lines of a log, joined on one line (for an error cell)."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    lines = [line for line in lines if line]
    return " | ".join(lines[-count:])[-400:]


# ----------------------------------------------------------------------------- catdog runs


def snapshot_sources(dest: Path) -> dict[str, Any]:
    """Copy catdog/, tasks/ and flows/ into `dest`, so edits made meanwhile don't change a run.

    Returns the git HEAD, the working tree's status and a hash of the copied sources.
    """
    digest = hashlib.sha256()
    for part in SNAPSHOT_PARTS:
        shutil.copytree(
            REPO / part, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        for path in sorted((dest / part).rglob("*.py")):
            digest.update(path.relative_to(dest).as_posix().encode())
            digest.update(path.read_bytes())
    return {
        "path": str(dest),
        "git_head": _git("rev-parse", "HEAD"),
        "git_status": _git("status", "--short", "--", *SNAPSHOT_PARTS),
        "sources_sha256": digest.hexdigest()[:16],
    }


def snapshot_revision(revision: str, dest: Path) -> dict[str, Any]:
    """catdog/, tasks/ and flows/ as committed at git `revision`, written into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    archived = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, *SNAPSHOT_PARTS], capture_output=True
    )
    if archived.returncode != 0:
        reason = archived.stderr.decode(errors="replace").strip().splitlines()
        raise SystemExit(f"git revision {revision!r}: {reason[-1] if reason else 'not found'}")
    archive = archived.stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return {"path": str(dest), "git_head": _git("rev-parse", revision), "git_status": ""}


def snapshot_facts(snapshot: dict[str, Any]) -> dict[str, str]:
    """The 'catdog sources' line of a section: which code it measured."""
    if not snapshot:
        return {"catdog sources": "the checkout itself (--no-snapshot)"}
    dirty = snapshot["git_status"].replace("\n", "; ") or "clean"
    return {
        "catdog sources": f"copy taken at start, git HEAD {snapshot['git_head'][:10]}, "
        f"sources sha256 {snapshot['sources_sha256']}, uncommitted: {dirty}"
    }


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """--data and --weights, by default the copies in ../shared."""
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "cats_and_dogs_filtered.zip")
    parser.add_argument(
        "--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.h5")
    )


def add_from_json_argument(parser: argparse.ArgumentParser) -> None:
    """--from-json: render a section again from an earlier run's raw JSON, measuring nothing."""
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="only re-render the section of an earlier run from its raw JSON into --out",
    )


def resolve_inputs(args: argparse.Namespace) -> None:
    """Absolute --data and --weights paths, since runs start in other folders."""
    args.data = args.data.expanduser().resolve()
    if args.weights not in ("imagenet", "none"):
        args.weights = str(Path(args.weights).expanduser().resolve())


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def catdog_env(source_root: Path | None, prefect_home: Path | None = None) -> dict[str, str]:
    """The environment of a catdog run: the snapshot (if any) ahead of the editable install.

    With `prefect_home`, Prefect's database and settings live there instead of ~/.prefect, so
    the benchmark's temporary API servers share no SQLite file with anyone else's runs.
    """
    env = dict(os.environ)
    if prefect_home is not None:
        prefect_home.mkdir(parents=True, exist_ok=True)
        env["PREFECT_HOME"] = str(prefect_home)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    if source_root is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(source_root), *filter(None, [env.get("PYTHONPATH")])]
        )
    return env


def flow_script(source_root: Path | None) -> Path:
    """flows/train_flow.py of the snapshot, or of the checkout."""
    return (source_root or REPO) / "flows" / "train_flow.py"


def read_summary(artifacts: Path) -> dict[str, Any]:
    """`<artifacts>/summary.json` of a finished catdog run."""
    return json.loads((artifacts / "summary.json").read_text())


def measure_catdog(
    command: list[str],
    log_path: Path,
    artifacts: Path,
    *,
    timeout: float | None,
    env: dict[str, str],
) -> tuple[Run, dict[str, Any] | None]:
    """Measure one catdog command and read the summary.json it wrote.

    An earlier summary.json is removed first, since a cached rerun must write its own; a run
    that leaves none (or an unreadable one) gets that as its error and no summary.
    """
    (artifacts / "summary.json").unlink(missing_ok=True)
    run = measure(command, log_path, timeout=timeout, env=env)
    summary = None
    if run.error is None:
        try:
            summary = read_summary(artifacts)
        except (OSError, ValueError) as exc:
            run.error = f"no summary.json: {exc}"
    return run, summary


def own_epoch_seconds(models: dict[str, Any], name: str) -> list[float]:
    """A model's epoch times from summary.json's `models`. The history of a model that starts
    from another begins with that model's epochs; only its own epochs are its to time."""
    seconds = models[name]["epoch_seconds"]
    start = catalog.spec(name).starts_from
    if start and start in models:
        return seconds[len(models[start]["epoch_seconds"]) :]
    return seconds


# ----------------------------------------------------------------------------- figures


def median_after_first(seconds: list[float]) -> float | None:
    """Median epoch time of epochs 2..N (epoch 1 carries tracing and warm-up); N=1: epoch 1."""
    if not seconds:
        return None
    return float(median(seconds[1:] if len(seconds) > 1 else seconds))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    """A table cell: numbers rounded, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def fmt_gib(value: int | None) -> str:
    return "–" if not value else f"{value / GIB:.2f} GiB"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**holds**" if ok else "**fails**")


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- environment


def machine() -> dict[str, Any]:
    """CPU model, cores and memory of this machine."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "os": f"{platform.system()} {platform.release()}",
    }


def bf16_flags() -> str:
    """The CPU's AVX-512 and bfloat16 flags, which decide catdog's `auto` precision."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    found = sorted(flags & {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return ", ".join(found) or "none of avx512f, avx512_bf16, amx_bf16 (AVX2 at most)"


def versions() -> dict[str, str]:
    """Python and the libraries that matter, read from package metadata (no imports)."""
    found = {"python": platform.python_version()}
    for label, candidates in (
        ("tensorflow", ("tensorflow-cpu", "tensorflow")),
        ("keras", ("keras",)),
        ("prefect", ("prefect",)),
        ("numpy", ("numpy",)),
    ):
        for name in candidates:
            try:
                found[label] = f"{metadata.version(name)} ({name})"
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def environment_markdown(extra: dict[str, Any] | None = None) -> str:
    """Machine and versions as a short Markdown list."""
    box = machine()
    lines = [
        f"- machine: {box['cpu']}, {box['cores']} cores, "
        f"{box['memory_bytes'] / GIB:.1f} GiB RAM, {box['os']}, no GPU used",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
    ]
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines)


def command_line() -> str:
    """The exact command this script was started with."""
    import shlex

    return shlex.join([Path(sys.executable).as_posix(), *sys.argv])


def run_facts() -> dict[str, str]:
    """When, on which commit and CPU flags, and by which command a measurement ran."""
    return {
        "date": now(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "command": command_line(),
        "bf16_flags": bf16_flags(),
    }


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


# ----------------------------------------------------------------------------- output


HISTORY_INTRO = (
    "# catdog benchmark history\n\n"
    "Superseded figures, kept for reference: sections a newer measurement replaced in "
    "RESULTS.md (or ASSIGNMENT.md), verbatim, newest first; their raw JSON is in the git "
    "history.\n"
)


def write_section(path: Path, name: str, body: str, title: str) -> None:
    """Put `body` into `path` between this section's markers, replacing an earlier copy.

    Sections written by other modes (or other scripts) are kept, so one results file can
    collect the comparison, the scaling run and the full flow. A replaced copy that differs
    goes to the top of HISTORY.md beside `path`, so the results file holds today's figures only
    and the earlier ones are not lost.
    """
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.is_file() else f"# {title}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        earlier, tail = rest.split(end, 1)
        if f"{start}{earlier}{end}" != block:
            archive_section(path.with_name("HISTORY.md"), f"{start}{earlier}{end}")
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    _write_atomically(path, text)


def archive_section(history: Path, block: str) -> None:
    """Put a superseded section at the top of the history file, below its intro."""
    text = history.read_text() if history.is_file() else HISTORY_INTRO
    first = text.find("<!-- bench:")
    intro, sections = (text, "") if first < 0 else (text[:first], text[first:])
    _write_atomically(history, f"{intro.rstrip()}\n\n{block}\n\n{sections}".rstrip() + "\n")


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@dataclass
class RawLog:
    """Every measurement as JSON beside the Markdown file, rewritten after each one."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)
