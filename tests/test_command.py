"""One `catdog` command: the flow's commands beside the library's, and every `catdog` command
line the README shows is one the command line takes, as written."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from catdog.__main__ import FLOW_COMMANDS, build_parser
from tests.conftest import REPO

LIBRARY_COMMANDS = ("predict", "export", "registry", "cache")
CATDOG = Path(sys.executable).with_name("catdog")


def _help(*command: str) -> str:
    result = subprocess.run(
        [*command, "--help"], capture_output=True, text=True, timeout=120, check=True
    )
    return result.stdout


def test_catdog_help_lists_every_command_without_importing_prefect_or_tensorflow():
    code = (
        "import sys\n"
        "from catdog.__main__ import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as done:\n    assert done.code == 0\n"
        "print('heavy:', sorted(m for m in ('prefect', 'tensorflow', 'keras') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    listed = re.findall(r"^    (\w+) ", out, re.M)
    assert listed == [*FLOW_COMMANDS, *LIBRARY_COMMANDS]
    assert "heavy: []" in out


def test_the_installed_command_and_python_m_catdog_are_the_same_command():
    assert _help(str(CATDOG)) == _help(sys.executable, "-m", "catdog")


@pytest.mark.slow  # each imports Prefect and the flow
@pytest.mark.parametrize(
    ("command", "option"),
    [("run", "--runner"), ("serve", "--cron"), ("alerts", "--webhook"), ("watch", "--settle")],
)
def test_the_flow_commands_answer_under_their_catdog_names(command, option):
    text = _help(sys.executable, "-m", "catdog", command)
    assert text.startswith(f"usage: catdog {command} ")
    assert option in text


@pytest.mark.slow
def test_alerts_without_a_destination_is_refused_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "catdog", "alerts"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "catdog alerts: error: give --webhook or --slack-webhook" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("data", "api", "said"),
    [
        ("missing", "http://127.0.0.1:9/api", "--data {tmp}/missing: no such file or folder"),
        (".", None, "catdog watch talks to a Prefect server: start one"),
        (
            ".",
            "http://127.0.0.1:9/api",
            "catdog watch: the Prefect API at http://127.0.0.1:9/api does not answer",
        ),
    ],
)
def test_watch_stops_in_one_line_on_a_missing_source_or_no_server(data, api, said, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"PREFECT_API_URL": api} if api else {})
    command = [sys.executable, "-m", "catdog", "watch", "--data", str(tmp_path / data), "--once"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {said.format(tmp=tmp_path)}")
    assert not (tmp_path / "artifacts").exists()  # nothing written


# ----------------------------------------------------------------------------- the README


def readme_command_lines() -> list[str]:
    """Every `catdog ...` and `make run ...` line of the README's bash blocks, continuations
    joined, comments and the recipe's shell variables left as they are."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            code = line.split(" #", 1)[0].strip()
            if re.match(r"(\.venv/bin/)?catdog\b|make run\b", code):
                lines.append(code)
    return lines


def _words(line: str) -> list[str]:
    """The line's words with each shell variable standing for a plain value."""
    words = shlex.split(line.replace('"$@"', ""))
    return [re.sub(r"\$\{?(\w+)\}?", r"\1", word) for word in words]


def _parse(command: str, arguments: list[str]) -> argparse.Namespace:
    """`catdog command arguments` parsed by the parser that the command line would use."""
    from flows.cli import COMMAND, alerts_parser, run_parser, serve_parser, watch_parser

    parsers = {
        "run": run_parser,
        "serve": serve_parser,
        "alerts": alerts_parser,
        "watch": watch_parser,
    }
    if command in parsers:
        return parsers[command](COMMAND).parse_args(arguments)
    if command == "predict":
        from catdog import predict

        parser = argparse.ArgumentParser(prog="catdog predict")
        predict.add_arguments(parser)
        return parser.parse_args(arguments)
    return build_parser().parse_args([command, *arguments])


@pytest.mark.slow  # the flow's parsers import Prefect and the flow
def test_every_catdog_command_in_the_readme_is_taken_as_written():
    lines = readme_command_lines()
    shown = set()
    for line in lines:
        words = _words(line)
        if words[:2] == ["make", "run"]:
            # make run DATA=... WEIGHTS=... ARGS="...": what the Makefile hands `catdog run`
            settings = dict(word.split("=", 1) for word in words[2:])
            command = "run"
            arguments = [f"--{k.lower()}={v}" for k, v in settings.items() if k != "ARGS"]
            arguments += shlex.split(settings.get("ARGS", ""))
        else:
            command, arguments = words[1], words[2:]
        shown.add(command)
        try:
            _parse(command, arguments)
        except SystemExit as refused:
            if refused.code != 0:  # --help exits 0
                pytest.fail(f"the README's `{line}` is refused by the command line")
    assert shown == {*FLOW_COMMANDS, *LIBRARY_COMMANDS}, "a command the README never shows"
