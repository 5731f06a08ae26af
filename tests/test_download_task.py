"""The download task under Prefect's real engine: retried on transient errors only."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prefect import flow

from catdog.errors import PermanentDownloadError
from catdog.layout import Layout
from tasks.caching import bind_to_artifacts
from tasks.data import download_dataset

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]  # a Prefect API


class Scripted(ThreadingHTTPServer):
    def __init__(self, body: bytes, statuses: list[int]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.body = body
        self.statuses = statuses
        self.requests = 0


class Handler(BaseHTTPRequestHandler):
    server: Scripted

    def do_GET(self) -> None:
        self.server.requests += 1
        statuses = self.server.statuses
        status = statuses.pop(0) if statuses else 200
        body = self.server.body if status == 200 else b"busy"
        self.send_response(status)
        if status == 503:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def serve(dataset_zip: Path) -> Iterator:
    servers: list[Scripted] = []

    def start(statuses: list[int]) -> Scripted:
        server = Scripted(dataset_zip.read_bytes(), statuses)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def fetch(url: str, artifacts: Path) -> dict:
    layout = Layout.at(artifacts)

    @flow
    def just_download() -> dict:
        task = bind_to_artifacts(download_dataset, layout).with_options(retry_delay_seconds=0)
        return task(data=url, sha256=None, revision="", artifacts=str(layout.root))

    return just_download()


def test_two_503s_then_success_is_retried_by_prefect(serve, tmp_path, dataset_zip):
    server = serve([503, 503])
    url = f"http://127.0.0.1:{server.server_address[1]}/tiny.zip"
    record = fetch(url, tmp_path / "artifacts")
    assert server.requests == 3
    archive = Layout.at(tmp_path / "artifacts").resolve(record.dir) / "archive.zip"
    assert archive.read_bytes() == dataset_zip.read_bytes()
    assert not list((tmp_path / "artifacts").rglob("*.part"))


def test_404_is_not_retried_and_fails_clearly(serve, tmp_path):
    server = serve([404])
    url = f"http://127.0.0.1:{server.server_address[1]}/missing.zip"
    with pytest.raises(PermanentDownloadError, match="404") as error:
        fetch(url, tmp_path / "artifacts")
    assert url in str(error.value)
    assert server.requests == 1
    leftovers = [
        p for p in (tmp_path / "artifacts").rglob("*") if p.is_file() and ".prefect" not in p.parts
    ]
    assert leftovers == []


def test_an_archive_already_downloaded_is_not_fetched_again(serve, tmp_path):
    server = serve([])
    url = f"http://127.0.0.1:{server.server_address[1]}/tiny.zip"
    first = fetch(url, tmp_path / "artifacts")
    second = fetch(url, tmp_path / "artifacts")
    assert server.requests == 1
    assert first.files == second.files
