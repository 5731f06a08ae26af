"""Whether the archive at a URL changed since the last good download, asked without its body.

A scheduled run on a URL must see new data when the server has it, and must not download 68 MB
to learn that nothing changed. Each run asks the server for the archive's validators (ETag,
Last-Modified, Content-Length) with a HEAD request; the download stage is keyed by them, so an
unchanged archive is a cache hit that transfers no body, and a changed one is downloaded anew.
When the server cannot answer (unreachable, 5xx, an HTML page where an archive should be), the
run uses the last good download and says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict

import httpx

from catdog.data.sources import is_url
from catdog.data.store_source import is_store_folder
from catdog.errors import DataError
from catdog.io import atomic_write_json, read_json
from catdog.store import is_object_url, object_filesystem

_NO_HEAD = (405, 501)  # servers that do not implement HEAD: the archive must be fetched to tell


class SourceUnavailable(Exception):
    """The server could not say whether the archive changed."""


class GoodDownload(TypedDict):
    """What the memo remembers of a URL's last good download."""

    revision: str  # the validators it was keyed by (`probe`)
    sha256: str  # the archive's content
    downloaded_at: str  # ISO 8601, UTC


@dataclass(frozen=True)
class SourceCheck:
    revision: str  # what the download stage is keyed by: the server's validators
    fresh: bool  # False: the server was not asked, or could not answer; last good download used
    warning: str | None = None  # one line for the terminal, the UI and summary.json


def probe(url: str, *, timeout: float = 10.0, attempts: int = 3, backoff: float = 1.0) -> str:
    """The archive's validators at `url`, as a revision string, from a HEAD request.

    Args:
        url: An http(s) URL. Redirects are followed.
        timeout: Seconds for each connect or read.
        attempts: Tries for a transient failure (a connection error, a timeout, a 5xx or 429).
        backoff: Seconds before the second try, doubling after each.

    Returns:
        JSON of ETag, Last-Modified and Content-Length. A server that gives none of them (or
        does not implement HEAD) gets a revision unique to this moment, so the archive is
        downloaded and identified by its content.

    Raises:
        SourceUnavailable: The server could not be asked, answered an error, or answered with
            an HTML page (a portal or an error page, not an archive).
    """
    if is_object_url(url):
        return _probe_object(url)
    reason = "no answer"
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with httpx.Client(timeout=timeout, follow_redirects=True) as client:
                response = client.head(url, headers={"Accept-Encoding": "identity"})
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            continue
        status = response.status_code
        if status >= 500 or status == 429:
            reason = f"HTTP {status}"
            continue
        if status in _NO_HEAD:
            return _unvalidated()
        if status >= 400:
            raise SourceUnavailable(f"HTTP {status}")
        if "html" in response.headers.get("content-type", "").lower():
            raise SourceUnavailable("it answered with an HTML page, not an archive")
        validators = {
            "etag": response.headers.get("etag"),
            "last_modified": response.headers.get("last-modified"),
            "length": response.headers.get("content-length"),
        }
        if not any(validators.values()):
            return _unvalidated()
        return json.dumps(validators, sort_keys=True)
    raise SourceUnavailable(f"{reason} after {attempts} tries")


def _probe_object(url: str) -> str:
    """An object's validators (its ETag and size) from its metadata, without its body; the
    store's client retries transient failures itself."""
    fs, path = object_filesystem(url)
    try:
        info = fs.info(path, refresh=True)
    except FileNotFoundError as error:
        raise SourceUnavailable("no such object") from error
    except Exception as error:  # denied, unreachable: said in one line
        raise SourceUnavailable(f"{type(error).__name__}: {error}") from error
    validators = {"etag": info.get("ETag") or info.get("etag"), "length": info.get("size")}
    return json.dumps(validators, sort_keys=True, default=str)


def _unvalidated() -> str:
    return json.dumps({"unvalidated": datetime.now(UTC).isoformat()})


def is_unvalidated(revision: str) -> bool:
    """Whether `revision` is one `probe` made up for a server that gave no validators (unique
    to its moment: it tells no change)."""
    return "unvalidated" in json.loads(revision)


def check_source(data: str, memo: Path, *, offline: bool) -> SourceCheck:
    """`check_url` for a URL; a local zip or folder, or a folder in a store, is identified by
    its content instead (a folder in a store: its listing's ETags)."""
    if is_url(data) and not is_store_folder(data):
        return check_url(data, memo, offline=offline)
    return SourceCheck("", fresh=True)


def check_url(url: str, memo: Path, *, offline: bool) -> SourceCheck:
    """Decide which revision of the archive at `url` this run uses.

    Args:
        url: The dataset URL.
        memo: The file where the last good download of each URL is remembered.
        offline: Use the last good download without asking the server.

    Raises:
        DataError: `offline` (or a server that cannot answer) and no earlier download of `url`.
    """
    last = read_sources(memo).get(url)
    if offline:
        if last is None:
            raise DataError(f"--offline: no earlier download of {url} to use; run once online")
        return SourceCheck(
            last["revision"],
            fresh=False,
            warning=f"offline: using the last good download of {url} ({last['downloaded_at']})",
        )
    try:
        return SourceCheck(probe(url), fresh=True)
    except SourceUnavailable as problem:
        if last is None:
            # Nothing to fall back on: the download itself fails with its own retries and
            # its own error.
            return SourceCheck(_unvalidated(), fresh=True)
        warning = (
            f"could not ask {url} whether the dataset changed ({problem}); using the last good "
            f"download ({last['downloaded_at']})"
        )
        return SourceCheck(last["revision"], fresh=False, warning=warning)


def read_sources(memo: Path) -> dict[str, GoodDownload]:
    """URL -> its last good download: revision, content hash, time."""
    try:
        return dict(read_json(memo)) if memo.is_file() else {}
    except (OSError, ValueError):
        return {}


def remember(memo: Path, url: str, revision: str, sha256: str) -> None:
    """Record a good download of `url` (written whole, so a reader never sees half of it)."""
    sources = read_sources(memo)
    sources[url] = GoodDownload(
        revision=revision,
        sha256=sha256,
        downloaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    atomic_write_json(memo, sources)
