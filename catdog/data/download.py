"""Fetch one file from an http(s) or file:// URL: resumable, verified, and atomic.

A download makes exactly one attempt. Retrying belongs to the caller (a task with retries),
which is why every failure is classified as `TransientDownloadError` (trying again may help;
the `.part` file is kept so the next attempt resumes) or `PermanentDownloadError` (it will not;
nothing is left behind). `dest` only ever appears complete and verified.
"""

from __future__ import annotations

import email.utils
import http
import logging
import os
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx

from catdog.errors import PermanentDownloadError, TransientDownloadError
from catdog.hashing import sha256_file_uncached
from catdog.store import StoreError, is_object_url, object_filesystem

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int | None], None]

_URL_SCHEMES = frozenset({"http", "https", "file"})
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
_EOCD_SIGNATURE = b"PK\x05\x06"
# The end-of-central-directory record is 22 bytes followed by a comment of at most 65535 bytes,
# so a complete zip has its signature somewhere in this many trailing bytes.
_EOCD_SEARCH_BYTES = 22 + 0xFFFF
_HEAD_BYTES = 32
_LOG_INTERVAL_S = 2.0
_MB = 1_000_000
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
# 408 is the server timing out our request, so it is as retryable as a 5xx.
_TRANSIENT_4XX = frozenset({408, 429})
_CLIENT_ERROR_HINT = "check the URL or pass a local file with --data"


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    connect_timeout: float = 10.0,
    read_timeout: float = 30.0,
    chunk_size: int = 1 << 16,
    progress: ProgressCallback | None = None,
    expect_zip: bool = True,
) -> Path:
    """Download `url` to `dest` in one attempt, resuming a previous partial attempt if any.

    Bytes go to ``<dest>.part`` beside `dest`; only once the body is complete and verified is
    the part file renamed onto `dest`, so `dest` never holds a partial or unverified file.

    Args:
        url: An http, https or file URL. Redirects are followed.
        dest: Where the finished file goes. Its folder is created if missing. An existing file
            is replaced only by a complete, verified download.
        sha256: Expected hex SHA-256 of the whole file, or None to skip the check.
        connect_timeout: Seconds allowed to establish the connection.
        read_timeout: Seconds allowed between two reads; a stalled body fails after this long.
        chunk_size: Bytes per read from a file:// source. HTTP bodies are written as they
            arrive from the socket instead (up to 64 KiB at a time), because bytes buffered
            into a larger chunk would be lost, not resumable, if the connection then failed.
        progress: Called as ``progress(bytes_done, total)`` while bytes arrive; `bytes_done`
            counts resumed bytes too and `total` is None when the server does not say.
        expect_zip: Require the file to be a complete zip archive (rejects, for example, an
            HTML error page served with status 200, or a truncated archive).

    Returns:
        `dest`.

    Raises:
        TransientDownloadError: Trying again may help: connection failures, timeouts, a body
            cut short (the part file is kept so the next attempt resumes), HTTP 5xx, 408 and
            429 (`retry_after` holds the server's ``Retry-After`` in seconds, if sent).
        PermanentDownloadError: Trying again will not help: other HTTP 4xx, a checksum
            mismatch, a body that is not a zip, a missing local file, an unsupported scheme.
        OSError: Writing the part file or `dest` failed (for example, the disk is full).
    """
    dest = Path(dest)
    shown = _display_url(url)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    meter = _Meter(shown, progress)

    if scheme in ("http", "https"):
        content_type, length_known = _fetch_http(
            url,
            part,
            shown,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            meter=meter,
        )
    elif scheme == "file":
        _copy_local(url, part, shown, chunk_size=chunk_size, meter=meter)
        content_type, length_known = None, True
    elif is_object_url(url):
        _copy_object(url, part, shown, chunk_size=max(chunk_size, 1 << 22), meter=meter)
        content_type, length_known = None, True
    else:
        raise PermanentDownloadError(
            f"download of {shown} failed: unsupported URL scheme {scheme!r}; "
            "use an http, https, file or s3 URL"
        )

    _verify(
        part,
        shown,
        sha256=sha256,
        expect_zip=expect_zip,
        content_type=content_type,
        length_known=length_known,
    )
    os.replace(part, dest)
    log.info("saved %s to %s", shown, dest)
    return dest


def _fetch_http(
    url: str,
    part: Path,
    shown: str,
    *,
    timeout: httpx.Timeout,
    meter: _Meter,
) -> tuple[str | None, bool]:
    """Stream the body into `part`. Returns (Content-Type, whether the length was known)."""
    offset = part.stat().st_size if part.is_file() else 0
    # A part file is only worth keeping if its bytes are a prefix of the raw resource.
    state = {"resumable": True}
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client:
            # A second request happens only when a 206 answer does not start where we asked;
            # the part file is then useless and we start over within this same attempt.
            for _ in range(2):
                # Byte offsets for Range refer to the encoded body, so ask for no encoding.
                headers = {"Accept-Encoding": "identity"}
                if offset:
                    headers["Range"] = f"bytes={offset}-"
                    log.info("resuming %s at %.1f MB", shown, offset / _MB)
                with client.stream("GET", url, headers=headers) as response:
                    result = _receive(response, part, shown, offset, meter, state)
                if result is not None:
                    return result
                offset = 0
    except (httpx.UnsupportedProtocol, httpx.TooManyRedirects, httpx.LocalProtocolError) as exc:
        part.unlink(missing_ok=True)
        raise PermanentDownloadError(f"download of {shown} failed: {_describe(exc)}") from exc
    except httpx.InvalidURL as exc:
        raise PermanentDownloadError(f"download of {shown} failed: invalid URL ({exc})") from exc
    except (httpx.TransportError, httpx.DecodingError) as exc:
        if isinstance(exc, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise PermanentDownloadError(
                f"download of {shown} failed: TLS certificate not trusted ({exc})"
            ) from exc
        raise _transient_body_error(shown, part, _describe(exc), state["resumable"]) from exc
    raise TransientDownloadError(
        f"download of {shown} failed: the server answered a range request with a "
        "partial response that does not match; the next attempt starts over"
    )


def _receive(
    response: httpx.Response,
    part: Path,
    shown: str,
    offset: int,
    meter: _Meter,
    state: dict[str, bool],
) -> tuple[str | None, bool] | None:
    """Write one response's body into `part`; None means "start over without a Range"."""
    status = response.status_code
    if status == 416 and offset:
        # The part file does not fit the resource any more (it changed or shrank).
        part.unlink(missing_ok=True)
        raise TransientDownloadError(
            f"download of {shown} failed: the server refused to resume at byte {offset} "
            "(HTTP 416); the partial file was discarded and the next attempt starts over"
        )
    if status not in (200, 206):
        _raise_for_status(response, shown)

    body_length = _int_header(response, "content-length")
    total: int | None
    if status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
        if match is None or int(match.group(1)) != offset:
            log.warning(
                "%s: partial response starts elsewhere than byte %d (Content-Range %r); "
                "starting over",
                shown,
                offset,
                response.headers.get("content-range"),
            )
            part.unlink(missing_ok=True)
            return None
        total_text = match.group(3)
        if total_text != "*":
            total = int(total_text)
        else:
            total = offset + body_length if body_length is not None else None
        mode = "ab"
    else:
        if offset:
            log.info("%s: server ignored the range request; starting over from byte 0", shown)
        offset = 0
        total = body_length
        mode = "wb"

    encoded = response.headers.get("content-encoding", "identity").strip().lower()
    if encoded not in ("", "identity"):
        # Decoded bytes on disk do not line up with the server's byte ranges.
        state["resumable"] = False
        chunks: Iterator[bytes] = response.iter_bytes()
    else:
        chunks = response.iter_raw()

    meter.start(offset, total)
    with open(part, mode) as handle:
        for chunk in chunks:
            handle.write(chunk)
            meter.advance(len(chunk))
        handle.flush()
        os.fsync(handle.fileno())
    # h11 normally detects a short body itself; this guards any transport that does not.
    if body_length is not None and response.num_bytes_downloaded < body_length:
        raise _transient_body_error(
            shown,
            part,
            f"connection closed after {response.num_bytes_downloaded} of {body_length} bytes",
            state["resumable"],
        )
    meter.finish()
    return response.headers.get("content-type"), (body_length is not None or total is not None)


def _raise_for_status(response: httpx.Response, shown: str) -> None:
    status = response.status_code
    reason = response.reason_phrase or _standard_reason(status)
    if status >= 500 or status in _TRANSIENT_4XX:
        retry_after = _parse_retry_after(response.headers.get("retry-after"))
        wait = f"; the server asks to wait {retry_after:g} s" if retry_after is not None else ""
        raise TransientDownloadError(
            f"download of {shown} failed: HTTP {status} {reason}{wait}", retry_after=retry_after
        )
    if 400 <= status < 500:
        raise PermanentDownloadError(
            f"download of {shown} failed: HTTP {status} {reason}; {_CLIENT_ERROR_HINT}"
        )
    raise PermanentDownloadError(
        f"download of {shown} failed: unexpected HTTP {status} {reason}; {_CLIENT_ERROR_HINT}"
    )


def _copy_local(url: str, part: Path, shown: str, *, chunk_size: int, meter: _Meter) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise PermanentDownloadError(
            f"download of {shown} failed: file URLs on another host ({parts.netloc}) are not "
            "supported; mount the share and pass a local path"
        )
    source = Path(urllib.request.url2pathname(parts.path))
    try:
        src = open(source, "rb")  # noqa: SIM115 - closed by the `with` below
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        raise PermanentDownloadError(
            f"download of {shown} failed: {exc.strerror or exc}: {source}"
        ) from exc
    except OSError as exc:
        raise TransientDownloadError(f"download of {shown} failed: {exc}") from exc
    with src, open(part, "wb") as out:
        meter.start(0, os.fstat(src.fileno()).st_size)
        while True:
            try:
                chunk = src.read(chunk_size)
            except OSError as exc:
                # Network filesystems can fail mid-read and recover later.
                raise TransientDownloadError(
                    f"download of {shown} failed: reading {source}: {exc}"
                ) from exc
            if not chunk:
                break
            out.write(chunk)
            meter.advance(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    meter.finish()


def _copy_object(url: str, part: Path, shown: str, *, chunk_size: int, meter: _Meter) -> None:
    """An object in a store (s3://...) streamed to `part`; the store's client retries
    transient failures itself, so what is left is permanent or worth a later try."""
    try:
        fs, path = object_filesystem(url)
        with fs.open(path, "rb", block_size=chunk_size) as src, open(part, "wb") as out:
            meter.start(0, getattr(src, "size", None))
            while chunk := src.read(chunk_size):
                out.write(chunk)
                meter.advance(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    except (FileNotFoundError, PermissionError, StoreError) as exc:
        raise PermanentDownloadError(f"download of {shown} failed: {_describe(exc)}") from exc
    except OSError as exc:
        raise TransientDownloadError(f"download of {shown} failed: {_describe(exc)}") from exc
    meter.finish()


def _verify(
    part: Path,
    shown: str,
    *,
    sha256: str | None,
    expect_zip: bool,
    content_type: str | None,
    length_known: bool,
) -> None:
    """Check the finished part file; on failure delete it and raise."""
    if expect_zip:
        with open(part, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
        # Check the signature before the hash: "you got an HTML page" is the useful message.
        if not head.startswith(_ZIP_SIGNATURES):
            part.unlink(missing_ok=True)
            what = "an empty body" if not head else f"a body starting with {head!r}"
            raise PermanentDownloadError(
                f"download of {shown} failed: expected a zip archive but got "
                f"Content-Type {content_type or 'unknown'!r} and {what}"
            )
    if sha256:
        expected = sha256.strip().lower()
        actual = sha256_file_uncached(part)
        if actual != expected:
            part.unlink(missing_ok=True)
            raise PermanentDownloadError(
                f"download of {shown} failed: SHA-256 mismatch: expected {expected}, got {actual}"
            )
        # A matching hash proves the content; the structural check below adds nothing.
        return
    if expect_zip and not _has_zip_end_record(part):
        part.unlink(missing_ok=True)
        message = f"download of {shown} failed: the zip archive is truncated or corrupt"
        if length_known:
            # The server delivered every byte it promised, so it is serving a broken file.
            raise PermanentDownloadError(f"{message} (no end-of-central-directory record)")
        # Without a length a dropped connection looks like a clean end of the body.
        raise TransientDownloadError(f"{message}; the server sent no length, so it may be cut off")


def _has_zip_end_record(path: Path) -> bool:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(max(0, size - _EOCD_SEARCH_BYTES))
        return _EOCD_SIGNATURE in handle.read()


def _transient_body_error(
    shown: str, part: Path, reason: str, resumable: bool
) -> TransientDownloadError:
    size = part.stat().st_size if part.is_file() else 0
    if size and resumable:
        after = f"kept {size} bytes; the next attempt resumes"
    else:
        part.unlink(missing_ok=True)
        after = "the next attempt starts over"
    return TransientDownloadError(f"download of {shown} failed: {reason}; {after}")


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        kind = {
            httpx.ConnectTimeout: "connecting timed out",
            httpx.ReadTimeout: "no data arrived within the read timeout",
            httpx.WriteTimeout: "sending the request timed out",
            httpx.PoolTimeout: "timed out waiting for a connection",
        }.get(type(exc), "timed out")
        return kind
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _parse_retry_after(value: str | None) -> float | None:
    """Read ``Retry-After`` as seconds; it may be a number or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def _int_header(response: httpx.Response, name: str) -> int | None:
    try:
        value = int(response.headers.get(name, ""))
    except ValueError:
        return None
    return value if value >= 0 else None


def _standard_reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _display_url(url: str) -> str:
    """The URL for messages and logs, without any password in it."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))


class _Meter:
    """Reports progress to the callback on every chunk and to the log every few seconds."""

    def __init__(self, shown: str, callback: ProgressCallback | None) -> None:
        self._shown = shown
        self._callback = callback
        self._done = self._first = 0
        self._total: int | None = None
        self._began = self._logged = time.monotonic()

    def start(self, done: int, total: int | None) -> None:
        self._done = done
        self._first = done
        self._total = total
        self._began = time.monotonic()
        self._logged = self._began
        if self._callback is not None:
            self._callback(done, total)

    def advance(self, count: int) -> None:
        self._done += count
        if self._callback is not None:
            self._callback(self._done, self._total)
        now = time.monotonic()
        if now - self._logged >= _LOG_INTERVAL_S:
            self._logged = now
            log.info("%s", self._line(now))

    def finish(self) -> None:
        log.info("%s", self._line(time.monotonic()))

    def _line(self, now: float) -> str:
        elapsed = max(now - self._began, 1e-6)
        rate = (self._done - self._first) / elapsed / _MB
        if self._total:
            share = 100 * self._done / self._total
            amount = f"{self._done / _MB:.1f}/{self._total / _MB:.1f} MB ({share:.0f}%)"
        else:
            amount = f"{self._done / _MB:.1f} MB"
        return f"downloaded {amount} at {rate:.1f} MB/s from {self._shown}"
