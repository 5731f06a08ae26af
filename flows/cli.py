"""The flow's commands: a run, `serve`, `alerts` and `watch`; `catdog run|serve|alerts|watch`,
or `python flows/train_flow.py [serve|alerts|watch]` (the recipe's own entry).

Every option but where the tasks run is one of the flow's parameters (flows/options.py builds
them from the flow's signature). A run ends with its summary's path, or with one `error:` line:
exit code 2 for bad input (a hostile archive, an unreachable URL, a bad option) and 1 for
anything else; `--debug` (or CATDOG_DEBUG=1) shows the tracebacks too.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catdog import catalog
from catdog.checks import check_run_inputs
from catdog.cluster import DEFAULT_CPU_WORKERS
from catdog.config import RUN
from catdog.errors import CatdogError, StageFailed
from catdog.store import ObjectStore, is_store_url
from flows.console import DEBUG_ENV, debugging, one_line
from flows.local_api import EarlyApiServer

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment


@dataclass(frozen=True)
class CommandNames:
    """How the user called each command, for its `--help` and its errors."""

    run: str
    serve: str
    alerts: str
    watch: str


SCRIPT = CommandNames(
    *(f"python flows/train_flow.py{verb}" for verb in ("", " serve", " alerts", " watch"))
)
COMMAND = CommandNames("catdog run", "catdog serve", "catdog alerts", "catdog watch")

# Parameters whose default an environment variable overrides on the command line.
ENV = {
    "data": "CATDOG_DATA",
    "sha256": "CATDOG_DATA_SHA256",
    "weights": "CATDOG_WEIGHTS",
    "artifacts": "CATDOG_ARTIFACTS",
}


def _prepare_environment() -> None:
    """Before Prefect reads its settings: no telemetry (runs are often offline), and the
    library's own log lines (download progress, skipped images) beside the tasks' in the
    terminal and the UI; lines logged outside a flow run stay in the terminal."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "catdog,tasks")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # The temporary API server can take longer than Prefect's default 20 s on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _parser(prog: str, serve_as: str, alerts_as: str) -> argparse.ArgumentParser:
    from flows.options import add_flow_options
    from flows.train_flow import train_flow

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train and compare image classifiers (default: the cats-vs-dogs "
        "assignment's models) as a Prefect flow with cached stages.",
        epilog="Models: "
        + "; ".join(f"{spec.name}: {spec.description}" for spec in catalog.MODELS)
        + f". `{serve_as} --cron '0 3 * * 1' [options]` serves the same flow on a schedule; "
        f"`{alerts_as} --webhook URL` sets up notifications.",
    )
    add_flow_options(parser, train_flow.fn, env=ENV, optional_value={"refresh": "all"})
    parser.add_argument(
        "--debug",
        action="store_true",
        default=debugging(),
        help=f"show tracebacks, in the terminal as in the UI (env {DEBUG_ENV}=1)",
    )
    return parser


def at_least_one(unit: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number >= 1 (of `unit`, as the error message says)."""

    def convert(value: str) -> int:
        if not value.isdigit() or int(value) < 1:
            of = f" of {unit}" if unit else ""
            raise argparse.ArgumentTypeError(f"{value!r}: must be a whole number{of}, >= 1")
        return int(value)

    return convert


def seconds_at_least(least: float) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds, at least `least`."""

    def convert(value: str) -> float:
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds < least:
            raise argparse.ArgumentTypeError(f"{value!r}: must be a number of seconds >= {least:g}")
        return seconds

    return convert


# Prefect sends a run's heartbeat every 30 s at the most often: a bound under two of them would
# mark live runs crashed.
MIN_SILENT_AFTER = 60


def run_parser(names: CommandNames = SCRIPT) -> argparse.ArgumentParser:
    """The run options plus where the tasks run."""
    from flows.runners import RUNNERS

    parser = _parser(names.run, names.serve, names.alerts)
    where = parser.add_argument_group("where the tasks run")
    where.add_argument(
        "--runner",
        choices=RUNNERS,
        default="sequential",
        help="sequential: one task at a time in this process; dask: a temporary Dask cluster "
        "on this machine, independent tasks side by side (default: sequential)",
    )
    where.add_argument(
        "--workers",
        type=at_least_one(),
        metavar="N",
        help="worker processes of --runner dask, each with its share of the cores and at most "
        f"one GPU (default: one per visible GPU, else {DEFAULT_CPU_WORKERS})",
    )
    where.add_argument(
        "--dask-address",
        metavar="tcp://HOST:PORT",
        help="run the tasks on the Dask cluster whose scheduler listens there; needs a Prefect "
        "server that outlives the run (see README, Scaling out)",
    )
    return parser


def run_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options that are the flow's parameters, artifacts as an absolute path.

    A dict of Any: the flow's keyword arguments, each of its parameter's own type."""
    from flows.options import flow_parameters
    from flows.train_flow import train_flow

    parameters = flow_parameters(args, train_flow.fn)
    if not is_store_url(args.artifacts):
        parameters["artifacts"] = str(Path(args.artifacts).expanduser().resolve())
    return parameters


class ScheduleError(CatdogError):
    """A bad schedule for `serve`; reported in one line with exit code 2."""


def build_deployment(args: argparse.Namespace) -> RunnerDeployment:
    """The deployment `serve` registers: this flow, started by `--cron` or `--interval` and, with
    `--on-data-change`, by `catdog watch`'s event for its data; one run at a time."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Cron, Interval

    from flows.train_flow import train_flow

    try:
        schedule = Cron(args.cron, timezone="UTC") if args.cron else None
    except ValueError as error:
        raise ScheduleError(f"--cron {args.cron!r}: not a valid cron schedule") from error
    if args.interval:
        schedule = Interval(args.interval)
    deployment = train_flow.to_deployment(
        name=args.name,
        schedules=[schedule] if schedule else None,
        triggers=[data_change_trigger(args.name, args.data)] if args.on_data_change else None,
        parameters=run_parameters(args),
        tags=["catdog", "scheduled"],
        # A run that starts while one is under way waits for it rather than being cancelled: the
        # change that started it must be trained on, and the runs would contend for one lock.
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
    )
    assert isinstance(deployment, RunnerDeployment)
    return deployment


def data_change_trigger(deployment: str, data: str) -> Any:
    """The trigger that starts a run of `deployment` on each `catdog.data.changed` event about
    `data` (`catdog watch` settles bursts of changes into one event)."""
    from prefect.events import DeploymentEventTrigger

    from catdog.data.watch import EVENT, source_name

    name = source_name(data)
    return DeploymentEventTrigger(
        name=f"catdog: run {deployment} when its data changes",
        description=f"Made by `catdog serve --on-data-change` for {name}",
        expect={EVENT},
        match={"catdog.source": name},
        threshold=1,
    )


def serve_parser(names: CommandNames = SCRIPT) -> argparse.ArgumentParser:
    """The run options plus what starts a run and a deployment name, for `serve`."""
    parser = _parser(names.serve, names.serve, names.alerts)
    parser.description = "Serve the flow: register the deployment, then run each run that its "
    parser.description += "schedule or a change of its data starts, in this process, until "
    parser.description += "stopped (Ctrl-C). One run at a time: a run started while one is "
    parser.description += f"under way waits for it. `{names.watch}` announces data changes."
    parser.epilog = None
    starts = parser.add_argument_group("what starts a run (at least one)")
    schedule = starts.add_mutually_exclusive_group()
    schedule.add_argument("--cron", help="cron schedule in UTC, e.g. '0 3 * * 1'")
    schedule.add_argument(
        "--interval", type=at_least_one("seconds"), metavar="SECONDS", help="seconds between runs"
    )
    starts.add_argument(
        "--on-data-change",
        action="store_true",
        help=f"each catdog.data.changed event about --data (sent by `{names.watch}`)",
    )
    parser.add_argument("--name", default="scheduled-retraining", help="deployment name")
    # Nobody watches a scheduled run: data that changed trains and reports, production waits.
    parser.set_defaults(on_data_issue=RUN.unattended_on_data_issue)
    return parser


def alerts_parser(names: CommandNames = SCRIPT) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=names.alerts,
        description="Set up Prefect automations on the server PREFECT_API_URL names that notify "
        "when a catdog run fails or crashes, when production changes and when a data check "
        "fails, and one that marks a run crashed when its heartbeats stop; run again to replace "
        "them, --remove to take them down.",
    )
    parser.add_argument("--webhook", metavar="URL", help="POST JSON {subject, body} here")
    parser.add_argument("--slack-webhook", metavar="URL", help="a Slack incoming webhook")
    parser.add_argument(
        "--silent-after",
        type=seconds_at_least(MIN_SILENT_AFTER),
        default=RUN.silent_after,
        metavar="SECONDS",
        help="mark a catdog run crashed (and notify) when it sends no heartbeat for this long; "
        "keep it above the runs' PREFECT_FLOWS_HEARTBEAT_FREQUENCY (180 s by default) "
        f"({RUN.silent_after})",
    )
    parser.add_argument("--remove", action="store_true", help="remove the catdog automations")
    return parser


def watch_parser(names: CommandNames = SCRIPT) -> argparse.ArgumentParser:
    from catdog.config import OFFICIAL_DATA_URL

    parser = argparse.ArgumentParser(
        prog=names.watch,
        description="Look at a data source every few seconds, without reading an image or "
        "starting TensorFlow, and send a catdog.data.changed event to the Prefect server "
        "PREFECT_API_URL names when it changed and then stayed unchanged for --settle seconds. "
        f"A deployment served with `{names.serve} --on-data-change` runs on each.",
    )
    parser.add_argument(
        "--data",
        default=os.environ.get(ENV["data"], OFFICIAL_DATA_URL),
        help="the source: a folder of class folders, a .zip, or an http(s) URL (env "
        f"{ENV['data']}; default: the official archive's URL)",
    )
    parser.add_argument(
        "--every",
        type=at_least_one("seconds"),
        default=RUN.watch_every,
        metavar="SECONDS",
        help=f"seconds between looks ({RUN.watch_every})",
    )
    parser.add_argument(
        "--settle",
        type=seconds_at_least(0),
        default=RUN.watch_settle,
        metavar="SECONDS",
        help="how long a change must stay unchanged before it is announced, so that a burst "
        f"of changes (a folder being copied into) starts one run, on all of it "
        f"({RUN.watch_settle:g})",
    )
    parser.add_argument(
        "--artifacts",
        default=os.environ.get(ENV["artifacts"], RUN.artifacts),
        help="the artifacts folder; the watch keeps what it announced last in its watch/ "
        f"folder (env {ENV['artifacts']}; default ./{RUN.artifacts})",
    )
    parser.add_argument("--once", action="store_true", help="look once, then stop")
    return parser


def _watch(argv: list[str], names: CommandNames) -> int:
    args = watch_parser(names).parse_args(argv)
    from catdog.data.watch import source_name, state_file_for
    from flows.watch import watch

    try:
        source = source_name(args.data)
        _require_api(names.watch)
        state = state_file_for(Path(args.artifacts), source)
        watch(source, state, every=args.every, settle=args.settle, looks=1 if args.once else None)
    except CatdogError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        pass
    except Exception as error:  # a bug, a full disk: still one line
        print(f"error: {names.watch}: {type(error).__name__}: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


class NoServerError(CatdogError):
    """A command that needs a Prefect server that outlives it, without one."""


def _require_api(what: str) -> None:
    """Stop with one line unless PREFECT_API_URL names a server that answers this client."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    from flows.runners import check_api_access

    url = PREFECT_API_URL.value()
    if not url:
        raise NoServerError(
            f"{what} talks to a Prefect server: start one with `prefect server start` and set "
            "PREFECT_API_URL, e.g. PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    try:
        check_api_access()
    except httpx.HTTPError as error:
        reason = one_line(error) or type(error).__name__
        raise NoServerError(
            f"{what}: the Prefect API at {url} does not answer ({reason})"
        ) from None


def _alerts(argv: list[str], names: CommandNames) -> int:
    parser = alerts_parser(names)
    args = parser.parse_args(argv)
    if not args.remove and not (args.webhook or args.slack_webhook):
        parser.error("give --webhook or --slack-webhook (or --remove)")
    from prefect.settings import PREFECT_API_URL

    from flows import alerts

    try:
        _require_api(names.alerts)
    except CatdogError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    try:
        if args.remove:
            removed = alerts.remove_automations()
            print(f"removed {len(removed)} automation(s): {', '.join(removed) or 'none'}")
            return 0
        silent_after = timedelta(seconds=int(args.silent_after))
        for name in alerts.install_automations(args.webhook, args.slack_webhook, silent_after):
            print(f"automation: {name}")
    except Exception as error:  # the server refused or went away: one line, as everywhere
        message = f"{type(error).__name__}: {one_line(error)}"
        print(f"error: alerts on {PREFECT_API_URL.value()}: {message}", file=sys.stderr)
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    from prefect import serve

    from flows.console import quiet_tracebacks
    from flows.runners import check_api_access

    quiet_tracebacks()
    check_api_access()
    serve(build_deployment(args))
    return 0


def _lasting_api() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def _run(args: argparse.Namespace, api: EarlyApiServer | None) -> int:
    from prefect import tags

    from flows.runners import check_api_access, task_runner
    from flows.train_flow import train_flow

    runner = task_runner(args.runner, args.workers, args.dask_address)
    with api.in_use() if api else contextlib.nullcontext(), tags("catdog", *args.models):
        check_api_access()
        report = train_flow.with_options(task_runner=runner)(**run_parameters(args))
    print(f"summary: {report.summary}\nreport:  {report.report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python flows/train_flow.py [serve|alerts|watch] [options]`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["serve"], ["alerts"], ["watch"]):
        return command(argv[0], argv[1:])
    return command("run", argv)


def command(verb: str, argv: list[str], names: CommandNames = SCRIPT) -> int:
    """The flow's command `verb` ("run", "serve", "alerts" or "watch") with its options `argv`."""
    _prepare_environment()
    if verb == "alerts":
        return _alerts(argv, names)
    if verb == "watch":
        return _watch(argv, names)
    serving = verb == "serve"
    # A run's temporary API server starts now, before Prefect is imported, so that its start-up
    # overlaps this process's (see flows/local_api.py).
    plain_run = not serving and not {"-h", "--help"} & set(argv)
    api = EarlyApiServer.spawn() if plain_run else None
    try:
        return _main(argv, serving, api, names)
    finally:
        if api:
            api.stop()


def _main(argv: list[str], serving: bool, api: EarlyApiServer | None, names: CommandNames) -> int:
    parser = serve_parser(names) if serving else run_parser(names)
    args = parser.parse_args(argv)
    if serving and not (args.cron or args.interval or args.on_data_change):
        parser.error("say what starts a run: --cron, --interval or --on-data-change")
    if not serving and args.workers and (args.dask_address or args.runner != "dask"):
        parser.error(
            "--workers sizes the cluster of --runner dask; a --dask-address cluster "
            "has its own workers"
        )
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    if args.approve_promotion and not serving and not _lasting_api():
        parser.error(
            "--approve-promotion pauses the run until someone answers in the Prefect UI, which "
            "needs a Prefect server that outlives the run: start one with `prefect server "
            "start` and set PREFECT_API_URL"
        )
    try:
        if resolved := check_run_inputs(
            args.data, args.models, args.weights, args.transfer_image_size
        ):
            args.weights = resolved
        if is_store_url(args.artifacts):  # before the run: a store it cannot use, one line
            ObjectStore.at(args.artifacts).check()
        return _serve(args) if serving else _run(args, api)
    except (CatdogError, StageFailed) as error:
        if args.debug:
            traceback.print_exception(error)
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except Exception as error:  # not a stage's: the API, the cluster, a bug; still one line
        if args.debug:
            traceback.print_exception(error)
        print(
            f"error: {type(error).__name__}: {one_line(error)} (--debug shows where)",
            file=sys.stderr,
        )
        return 1
