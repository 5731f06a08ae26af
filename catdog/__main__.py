"""The catdog command: `catdog COMMAND [options]`, or `python -m catdog COMMAND [options]`.

    catdog run [options]              train and compare the models (the flow)
    catdog serve --cron '0 3 * * 1'   the same flow, served on a schedule (or --on-data-change)
    catdog watch --data FOLDER        announce the data's changes to start served runs
    catdog alerts --webhook URL       notifications through Prefect automations
    catdog predict IMAGE...           classify images with the production model
    catdog export | registry | cache  export production, list or roll back the registry, prune

This entry point is the one module of the package that reaches above the library: run, serve,
watch and alerts belong to the flow (`flows/cli.py`, also behind `python flows/train_flow.py`)
and are imported only when asked for, so the library's commands and `catdog --help` never import
Prefect or TensorFlow.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from catdog.commands import add_library_commands, run_library_command

# The flow's commands, each handed its own arguments whole: flows/cli.py declares their options.
FLOW_COMMANDS = {
    "run": "train and compare the models: the flow, with cached stages (see `run --help`)",
    "serve": "serve the flow on a schedule or on data changes until stopped (`serve --help`)",
    "watch": "announce a data source's changes: they start `serve --on-data-change` runs",
    "alerts": "notify a webhook or Slack when a run fails, production changes or data drifts",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="catdog",
        description="Train, compare, serve and manage image classifiers (a Prefect flow).",
        epilog="`catdog COMMAND --help` shows a command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in FLOW_COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False, prefix_chars="\0")
    add_library_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: the process's arguments) and run the chosen command."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] and arguments[0] in FLOW_COMMANDS:
        from flows.cli import COMMAND, command

        return command(arguments[0], arguments[1:], COMMAND)
    parser = build_parser()
    args, extra = parser.parse_known_args(arguments)
    return run_library_command(args, extra, parser)


if __name__ == "__main__":
    sys.exit(main())
