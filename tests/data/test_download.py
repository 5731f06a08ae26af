"""Fault injection for `download_file` against a real HTTP server on 127.0.0.1.

Each test scripts the server's answers request by request, then checks both the outcome and
what is left on disk: `dest` exists only when complete, `.part` only after a transient failure
in the middle of a body.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import socket
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from catdog.data.download import download_file
from catdog.data.sources import is_url
from catdog.errors import PermanentDownloadError, TransientDownloadError
from tests.http_site import Behaviour, Handler, Site, serving


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Site]:
    with serving(tmp_path / "www", "HTTP/1.1") as site:
        yield site


@pytest.fixture
def payload(tmp_path: Path) -> bytes:
    """A small real zip, large enough to span several chunks."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("cats/cat.0.jpg", os.urandom(150_000))
        archive.writestr("dogs/dog.0.jpg", os.urandom(150_000))
    data = buffer.getvalue()
    (tmp_path / "source.zip").write_bytes(data)
    return data


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "out" / "data.zip"


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir()) if dest.parent.exists() else []


# --- scripted server behaviours -------------------------------------------------------------


def _headers(handler: Handler, status: int, length: int, extra: dict[str, str]) -> None:
    handler.send_response(status)
    for name, value in extra.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(length))
    handler.end_headers()


def serve(
    body: bytes, *, content_type: str = "application/zip", honour_range: bool = True
) -> Behaviour:
    def respond(handler: Handler) -> None:
        requested = handler.headers.get("Range")
        if honour_range and requested:
            match = re.fullmatch(r"bytes=(\d+)-", requested)
            assert match, requested
            start = int(match.group(1))
            if start >= len(body):
                _headers(handler, 416, 0, {"Content-Range": f"bytes */{len(body)}"})
                return
            extra = {
                "Content-Type": content_type,
                "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}",
            }
            _headers(handler, 206, len(body) - start, extra)
            handler.wfile.write(body[start:])
            return
        _headers(handler, 200, len(body), {"Content-Type": content_type})
        handler.wfile.write(body)

    return respond


def status(code: int, headers: dict[str, str] | None = None) -> Behaviour:
    def respond(handler: Handler) -> None:
        text = f"error {code}".encode()
        _headers(handler, code, len(text), {"Content-Type": "text/plain", **(headers or {})})
        handler.wfile.write(text)

    return respond


def drop_after(body: bytes, sent: int) -> Behaviour:
    """Promise the whole body, send `sent` bytes, then close the connection."""

    def respond(handler: Handler) -> None:
        _headers(handler, 200, len(body), {"Content-Type": "application/zip"})
        handler.wfile.write(body[:sent])
        handler.wfile.flush()
        handler.close_connection = True

    return respond


def stall_after(body: bytes, sent: int) -> Behaviour:
    """Send `sent` bytes, then go silent until the test ends."""

    def respond(handler: Handler) -> None:
        _headers(handler, 200, len(body), {"Content-Type": "application/zip"})
        handler.wfile.write(body[:sent])
        handler.wfile.flush()
        handler.server.release.wait(timeout=5)
        handler.close_connection = True

    return respond


def wrong_partial(body: bytes) -> Behaviour:
    """Answer a range request with a 206 that starts at byte 0 instead of where asked."""

    def respond(handler: Handler) -> None:
        extra = {"Content-Range": f"bytes 0-{len(body) - 1}/{len(body)}"}
        _headers(handler, 206, len(body), extra)
        handler.wfile.write(body)

    return respond


# --- tests -----------------------------------------------------------------------------------


def test_503_twice_then_success(server: Site, payload: bytes, dest: Path) -> None:
    server.script = [
        status(503, {"Retry-After": "3"}),
        status(503, {"Retry-After": "1.5"}),
        serve(payload),
    ]
    for expected_wait in (3.0, 1.5):
        with pytest.raises(TransientDownloadError) as caught:
            download_file(server.url(), dest)
        assert caught.value.retry_after == expected_wait
        assert server.url() in str(caught.value) and "503" in str(caught.value)
        assert not dest.exists() and not _part(dest).exists()

    assert download_file(server.url(), dest) == dest
    assert dest.read_bytes() == payload
    assert _leftovers(dest) == ["data.zip"]


@pytest.mark.parametrize(
    ("code", "headers", "retry_after"),
    [
        (500, {}, None),
        (502, {}, None),
        (429, {"Retry-After": "7"}, 7.0),
        (503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # a date in the past
        (503, {"Retry-After": "soon"}, None),
    ],
)
def test_transient_statuses(
    server: Site,
    dest: Path,
    code: int,
    headers: dict[str, str],
    retry_after: float | None,
) -> None:
    server.script = [status(code, headers)]
    with pytest.raises(TransientDownloadError) as caught:
        download_file(server.url(), dest)
    assert caught.value.retry_after == retry_after
    assert str(code) in str(caught.value)
    assert _leftovers(dest) == []


def test_dropped_connection_resumes_with_range(server: Site, payload: bytes, dest: Path) -> None:
    half = len(payload) // 2
    server.script = [drop_after(payload, half), serve(payload)]

    with pytest.raises(TransientDownloadError) as caught:
        download_file(server.url(), dest)
    assert server.url() in str(caught.value)
    assert not dest.exists()
    kept = _part(dest).read_bytes()
    assert 0 < len(kept) <= half
    assert kept == payload[: len(kept)]

    download_file(server.url(), dest)
    assert server.seen[-1]["range"] == f"bytes={len(kept)}-"
    assert dest.read_bytes() == payload
    assert _leftovers(dest) == ["data.zip"]


def test_server_ignoring_range_restarts_cleanly(server: Site, payload: bytes, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    _part(dest).write_bytes(b"not the start of the file" * 4)
    server.script = [serve(payload, honour_range=False)]

    download_file(server.url(), dest)
    assert server.seen[0]["range"] == "bytes=100-"
    assert dest.read_bytes() == payload
    assert _leftovers(dest) == ["data.zip"]


def test_partial_response_at_wrong_offset_restarts(
    server: Site, payload: bytes, dest: Path
) -> None:
    dest.parent.mkdir(parents=True)
    _part(dest).write_bytes(payload[:1000])
    server.script = [wrong_partial(payload), serve(payload)]

    download_file(server.url(), dest)
    assert [seen["range"] for seen in server.seen] == ["bytes=1000-", None]
    assert dest.read_bytes() == payload
    assert _leftovers(dest) == ["data.zip"]


def test_416_discards_part_and_is_transient(server: Site, payload: bytes, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    _part(dest).write_bytes(payload + b"stale bytes from an older, longer file")
    server.script = [serve(payload)]

    with pytest.raises(TransientDownloadError, match="416"):
        download_file(server.url(), dest)
    assert _leftovers(dest) == []

    download_file(server.url(), dest)
    assert dest.read_bytes() == payload


def test_stalled_read_times_out_quickly(server: Site, payload: bytes, dest: Path) -> None:
    sent = 50_000
    server.script = [stall_after(payload, sent)]

    started = time.monotonic()
    with pytest.raises(TransientDownloadError) as caught:
        download_file(server.url(), dest, connect_timeout=2.0, read_timeout=0.5)
    assert time.monotonic() - started < 5.0
    assert server.url() in str(caught.value)
    assert not dest.exists()
    assert _part(dest).read_bytes() == payload[:sent]


def test_connection_refused_is_transient(dest: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data.zip"
    with pytest.raises(TransientDownloadError) as caught:
        download_file(url, dest, connect_timeout=2.0)
    assert url in str(caught.value)
    assert _leftovers(dest) == []


@pytest.mark.parametrize("code", [403, 404, 410])
def test_client_errors_are_permanent(server: Site, dest: Path, code: int) -> None:
    server.script = [status(code)]
    with pytest.raises(PermanentDownloadError) as caught:
        download_file(server.url(), dest)
    message = str(caught.value)
    assert server.url() in message and f"HTTP {code}" in message
    assert "\n" not in message
    assert len(server.seen) == 1
    assert _leftovers(dest) == []


def test_failure_leaves_existing_dest_untouched(server: Site, payload: bytes, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"previous good file")
    server.script = [drop_after(payload, 1000)]
    with pytest.raises(TransientDownloadError):
        download_file(server.url(), dest)
    assert dest.read_bytes() == b"previous good file"


def test_html_page_with_200_is_rejected(server: Site, dest: Path) -> None:
    page = b"<!DOCTYPE html><html><body>Please sign in to continue</body></html>"
    server.script = [serve(page, content_type="text/html; charset=utf-8")]
    with pytest.raises(PermanentDownloadError) as caught:
        download_file(server.url(), dest)
    message = str(caught.value)
    assert "text/html" in message
    assert repr(page[:32]) in message
    assert server.url() in message
    assert _leftovers(dest) == []


def test_truncated_zip_with_full_length_is_rejected(server: Site, dest: Path) -> None:
    broken = b"PK\x03\x04" + b"\0" * 500  # a zip signature but no central directory
    server.script = [serve(broken)]
    with pytest.raises(PermanentDownloadError, match="truncated or corrupt"):
        download_file(server.url(), dest)
    assert _leftovers(dest) == []


def test_expect_zip_false_accepts_any_body(server: Site, dest: Path) -> None:
    server.script = [serve(b"plain text", content_type="text/plain")]
    download_file(server.url(), dest, expect_zip=False)
    assert dest.read_bytes() == b"plain text"


def test_checksum_mismatch_is_permanent(server: Site, payload: bytes, dest: Path) -> None:
    wrong = "0" * 64
    actual = hashlib.sha256(payload).hexdigest()
    server.script = [serve(payload)]
    with pytest.raises(PermanentDownloadError) as caught:
        download_file(server.url(), dest, sha256=wrong)
    assert wrong in str(caught.value) and actual in str(caught.value)
    assert _leftovers(dest) == []


def test_checksum_match_succeeds_and_reports_progress(
    server: Site, payload: bytes, dest: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.script = [serve(payload)]
    calls: list[tuple[int, int | None]] = []
    with caplog.at_level(logging.INFO, logger="catdog.data.download"):
        download_file(
            server.url(),
            dest,
            sha256=hashlib.sha256(payload).hexdigest().upper(),
            progress=lambda done, total: calls.append((done, total)),
        )
    assert dest.read_bytes() == payload
    assert calls[-1] == (len(payload), len(payload))
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert any("(100%)" in record.getMessage() for record in caplog.records)


def test_file_url(tmp_path: Path, payload: bytes, dest: Path) -> None:
    source = tmp_path / "with space" / "source.zip"
    source.parent.mkdir()
    source.write_bytes(payload)
    assert download_file(source.as_uri(), dest, sha256=hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload
    assert _leftovers(dest) == ["data.zip"]


def test_missing_file_url_is_permanent(tmp_path: Path, dest: Path) -> None:
    url = (tmp_path / "missing.zip").as_uri()
    with pytest.raises(PermanentDownloadError) as caught:
        download_file(url, dest)
    assert url in str(caught.value)
    assert _leftovers(dest) == []


def test_password_is_not_shown(server: Site, dest: Path) -> None:
    server.script = [status(404)]
    url = server.url().replace("http://", "http://user:hunter2@")
    with pytest.raises(PermanentDownloadError) as caught:
        download_file(url, dest)
    assert "hunter2" not in str(caught.value) and "user:***@" in str(caught.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://example.com/data.zip", True),
        ("http://127.0.0.1:8000/x", True),
        ("file:///tmp/data.zip", False),  # a local file, read where it is
        ("/tmp/data.zip", False),
        ("data.zip", False),
        ("C:\\data\\cats.zip", False),
        ("ftp://example.com/data.zip", False),
        ("https://", False),
        ("http://[::1", False),
    ],
)
def test_is_url(value: str, expected: bool) -> None:
    assert is_url(value) is expected
