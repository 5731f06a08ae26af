"""Scheduled retraining left alone: `serve --interval` against a URL whose archive changes
before every other run, with `--keep-runs 3`.

    .venv/bin/python bench/soak.py [--runs 12] [--interval 40]

Starts its own `prefect server start` (own PREFECT_HOME, a free port) and an HTTP site on
127.0.0.1, serves the flow (model1, 3 epochs, 32x32, exports on), and after every run records
the artifacts folder's size, the serving process's resident memory and the Prefect database's
size. At the end `predict` and `registry rollback` must work. Writes section `soak` of
bench/RESULTS.md and RESULTS.soak.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# The repository root on the path: `bench` imports as a package, whichever script runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH,
    REPO,
    bf16_flags,
    command_line,
    environment_markdown,
    fmt,
    now,
    table,
    write_section,
)

MB = 1e6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def publish(path: Path, version: int, per_class: int = 40) -> None:
    """A tiny dataset in the official layout; each version's images differ, and which class is
    the bright one flips from version to version (a drift production cannot follow: each new
    version's model beats it, so production changes and there is something to roll back)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(version)
    staged = path.with_suffix(".tmp")
    with zipfile.ZipFile(staged, "w") as archive:
        for split, count in (("train", per_class), ("validation", per_class // 2)):
            bright = {"cats": 40, "dogs": 170} if version % 2 else {"cats": 170, "dogs": 40}
            for label, base in bright.items():
                for i in range(count):
                    pixels = rng.integers(0, 80, (30, 40, 3), dtype=np.uint8) + base
                    image = Image.fromarray(pixels.astype(np.uint8))
                    data = io.BytesIO()
                    image.save(data, format="JPEG", quality=90)
                    archive.writestr(f"pets/{split}/{label}/{label}.{i}.jpg", data.getvalue())
    staged.replace(path)


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--interval", type=int, default=40, help="seconds between runs")
    parser.add_argument("--keep-runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="catdog-soak-"))
    site_dir, artifacts, home = work / "site", work / "artifacts", work / "prefect-home"
    site_dir.mkdir()
    version = 1
    publish(site_dir / "pets.zip", version)
    site = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(site_dir)))
    threading.Thread(target=site.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{site.server_address[1]}/pets.zip"

    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    serving = None
    rows, raw = [], []
    try:
        _wait_healthy(env["PREFECT_API_URL"])
        command = [sys.executable, str(REPO / "flows/train_flow.py"), "serve"]
        command += ["--interval", str(args.interval), "--data", url, "--models", "model1"]
        command += ["--epochs", "3", "--image-size", "32", "--batch-size", "8"]
        command += ["--keep-runs", str(args.keep_runs), "--artifacts", str(artifacts)]
        with (work / "serve.log").open("w") as log:
            serving = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        for number in range(1, args.runs + 1):
            summary = _wait_for_run(artifacts, number, serving)
            changed = number % 2 == 1  # the archive changes before every other run
            figures = {
                "run": number,
                "data_version": version,
                "promoted": summary["promotion"]["promoted"],
                "computed": sorted(t for t, s in summary["tasks"].items() if s == "Completed"),
                "artifacts_bytes": size(artifacts),
                "serve_rss_bytes": rss(serving.pid),
                "database_bytes": size(home),
            }
            raw.append(figures)
            rows.append(
                [
                    str(number),
                    str(version),
                    "yes" if figures["promoted"] else "no",
                    str(len(figures["computed"])),
                    fmt(figures["artifacts_bytes"] / MB, 1, " MB"),
                    fmt(figures["serve_rss_bytes"] / MB, 0, " MB"),
                    fmt(figures["database_bytes"] / MB, 1, " MB"),
                ]
            )
            print(rows[-1], flush=True)
            if changed:
                version += 1
                publish(site_dir / "pets.zip", version)
    finally:
        if serving is not None:
            serving.send_signal(signal.SIGINT)
            serving.wait(timeout=60)
        after = _check_predict_and_rollback(artifacts, work, env)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        site.shutdown()

    fourth, last = raw[3], raw[-1]
    growth = last["artifacts_bytes"] / fourth["artifacts_bytes"]
    memory = last["serve_rss_bytes"] / fourth["serve_rss_bytes"]
    per_run = (last["database_bytes"] - fourth["database_bytes"]) / (len(raw) - 4)
    body = "\n".join(
        [
            f"## Soak: {args.runs} scheduled runs, the source changing before every other one "
            f"({now()})",
            "",
            f"`{command_line()}`",
            "",
            environment_markdown({"CPU flags": bf16_flags()}),
            "",
            table(
                [
                    "run",
                    "data version",
                    "promoted",
                    "tasks computed",
                    "artifacts",
                    "serve RSS",
                    "Prefect home (db)",
                ],
                rows,
            ),
            "",
            f"- artifacts after run {len(raw)} / after run 4: {growth:.2f}x (goal at most 1.2x)",
            f"- serving process memory after run {len(raw)} / after run 4: {memory:.2f}x "
            "(goal within 10%)",
            f"- Prefect's database grew {per_run / 1e3:.0f} KB a run from run 4 on",
            f"- after the last run: {after}",
        ]
    )
    write_section(args.out, "soak", body, "soak")
    (args.out.parent / "RESULTS.soak.json").write_text(json.dumps(raw, indent=2) + "\n")
    print(body)
    return 0


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _wait_healthy(api: str, timeout: float = 180) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError("the Prefect server did not start")


def _wait_for_run(artifacts: Path, number: int, serving: subprocess.Popen) -> dict:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        found = sorted((artifacts / "05_reports/runs").glob("*/summary.json"))
        if len(found) >= number:
            return json.loads(found[number - 1].read_text())
        if serving.poll() is not None:
            raise RuntimeError("serve stopped")
        time.sleep(1)
    raise RuntimeError(f"run {number} did not finish")


def _check_predict_and_rollback(artifacts: Path, work: Path, env: dict[str, str]) -> str:
    photos = work / "photos"
    photos.mkdir()
    with zipfile.ZipFile(work / "site" / "pets.zip") as archive:
        names = [n for n in archive.namelist() if n.endswith(".jpg")][:4]
        for name in names:
            (photos / Path(name).name).write_bytes(archive.read(name))
    catdog = [sys.executable, "-m", "catdog"]
    predict = subprocess.run(
        [*catdog, "predict", str(photos), "--artifacts", str(artifacts)],
        env=env,
        capture_output=True,
        text=True,
    )
    rollback = subprocess.run(
        [*catdog, "registry", "rollback", "--artifacts", str(artifacts)],
        env=env,
        capture_output=True,
        text=True,
    )
    said = rollback.stdout.strip() or rollback.stderr.strip()
    return (
        f"predict exit {predict.returncode} ({len(predict.stdout.splitlines()) - 1} images), "
        f"registry rollback exit {rollback.returncode} ({said})"
    )


if __name__ == "__main__":
    sys.exit(main())
