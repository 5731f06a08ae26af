"""Hosts that share nothing, on one machine: a process in a mount namespace of its own, with an
empty tmpfs over the files the client wrote (used by the store tests and bench/cluster.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def namespaces_refused() -> str | None:
    """Why processes cannot get mount namespaces of their own here (None: they can)."""
    probe = ["unshare", "--mount", "--propagation", "private", "true"]
    try:
        result = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except OSError as error:
        return f"unshare: {error}"
    return None if result.returncode == 0 else f"unshare --mount: {result.stderr.strip()}"


def on_a_host_of_its_own(command: list[str], hidden: Path, home: Path) -> list[str]:
    """`command` in a mount namespace of its own, with an empty tmpfs over `hidden` (every
    file the client wrote) and `home` made in it."""
    script = f'mount -t tmpfs tmpfs "{hidden}" && mkdir -p "{home}" && cd "{home}" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *command]
