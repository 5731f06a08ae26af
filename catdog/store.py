"""An object store (S3, or any fsspec filesystem) as the artifacts' truth, with a local cache.

`--artifacts s3://bucket/prefix` keeps the same layout as a local artifacts folder, in the
store. Each host works in a local copy of it (its cache, under `CATDOG_CACHE_DIR`), so that
streaming, memory-mapping and the hash memo work on local files as they always have:

* a stage output is sealed locally, then uploaded file by file with its `record.json` last,
  and the record is created once (`If-None-Match: *`): a reader that finds a record finds every
  file it lists, and a sealed output never changes;
* a host that needs an output it lacks downloads it into its cache and checks every file
  against the record's hashes before anything reads it.

Credentials and the endpoint come from the store's own settings (for S3 the standard `AWS_*`
variables, `AWS_ENDPOINT_URL` included), never from catdog's parameters, so they never reach a
log, the summary or the Prefect UI.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from catdog.errors import CatdogError
from catdog.io import json_bytes

CACHE_ENV = "CATDOG_CACHE_DIR"
CHECK_OBJECT = ".prefect/store-check"  # written when a run starts: proves the credentials write

# Connection settings per protocol: an endpoint that does not answer fails in seconds, not
# after botocore's minute-long default, and transient faults are retried with backoff.
_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {
        # Registries and checkpoints change under other hosts: every look asks the store.
        "use_listings_cache": False,
        # Parts of one file in flight at once: with UPLOAD_PART and UPLOAD_FILES, what an
        # upload holds in memory stays near 128 MiB, whatever the files' sizes.
        "max_concurrency": 2,
        "config_kwargs": {
            "connect_timeout": 5,
            "read_timeout": 60,
            "retries": {"max_attempts": 5, "mode": "standard"},
        },
    },
}


UPLOAD_PART = 8 << 20  # bytes per part of a multipart upload (S3's least is 5 MiB)
UPLOAD_FILES = 8  # files uploaded at once


@dataclass(frozen=True)
class StoredObject:
    size: int  # bytes
    modified: float  # when it was written, seconds since the epoch (0: the store did not say)


class StoreError(CatdogError):
    """The object store cannot be used: unreachable, credentials refused, no such bucket."""


class StoreFault(StoreError):
    """The store stopped answering after the run began (its retries spent): not the user's
    input, so exit code 1, as for any other failure of the machine."""

    exit_code = 1


class StoreConflict(CatdogError):
    """A conditional write lost: the object exists, or changed since it was read."""


def is_store_url(location: str | os.PathLike[str]) -> bool:
    """True for `scheme://...` other than `file://`: an object store, not a local folder."""
    scheme = urlsplit(str(location)).scheme
    return len(scheme) > 1 and scheme != "file"  # a Windows drive letter is not a scheme


def cache_root() -> Path:
    """Where this host keeps its copies of stores: `CATDOG_CACHE_DIR`, else the user's cache."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser().resolve() / "catdog"


@dataclass(frozen=True)
class ObjectStore:
    """The artifacts at `url` (`scheme://bucket/prefix`), read and written by relative path."""

    url: str
    flag: str = field(default="--artifacts", compare=False)  # the option that named it

    @classmethod
    def at(cls, url: str) -> ObjectStore:
        return cls(str(url).rstrip("/"))

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def bucket(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def base(self) -> str:
        """The store's root as its filesystem names it: `bucket/prefix`."""
        parts = urlsplit(self.url)
        return f"{parts.netloc}{parts.path}".rstrip("/")

    @property
    def cache_folder(self) -> Path:
        """This host's copy of the store: one folder per URL, named after its prefix, quoted
        whole (`a/b` is `a%2Fb`, apart from `a_b`; the bucket's root is `%2F`)."""
        parts = urlsplit(self.url)
        prefix = quote(parts.path.strip("/") or "/", safe="")
        return cache_root() / "stores" / parts.scheme / parts.netloc / prefix

    @property
    def fs(self) -> Any:
        """The store's filesystem, whose failures to answer (after its own retries) raise
        StoreFault, in words that name the store."""
        try:
            filesystem = _filesystem(self.scheme, _settings_in_environment())
        except (ImportError, ValueError) as error:
            raise StoreError(
                f"{self.flag} {self.url}: no filesystem for {self.scheme}:// is installed "
                f"({error}); for S3 install s3fs (pip install 'catdog[s3]')"
            ) from error
        return _Explained(filesystem, self.explain, self.url)

    def answering(self) -> bool:
        """False for `FAULT_MEMORY_SECONDS` after a call of this process found the store not
        answering: what is only an economy (a lease, a stop request) is not tried meanwhile,
        when each try would wait out the store's retries."""
        last = _LAST_FAULT.get(self.url)
        return last is None or time.monotonic() - last > FAULT_MEMORY_SECONDS

    def key(self, relative: str) -> str:
        return f"{self.base}/{relative}"

    # Checks ------------------------------------------------------------------------------

    def check(self, *, write: bool = True) -> None:
        """Read (and with `write`, write) the store once, so that a command with a store it
        cannot use stops before any work, in one line that says what to fix.

        Raises:
            StoreError: The endpoint does not answer, the credentials are refused, the bucket
                does not exist.
        """
        try:
            if self.scheme == "s3":
                # The prefix, not the bucket: credentials scoped to the prefix (an IAM policy
                # with an `s3:prefix` condition) may not list the bucket's root.
                prefix = self.base.partition("/")[2]
                self.fs.call_s3(
                    "list_objects_v2",
                    Bucket=self.bucket,
                    Prefix=f"{prefix}/" if prefix else "",
                    MaxKeys=1,
                )
            else:
                self.fs.ls(self.bucket, refresh=True)
            if write:
                self.fs.pipe_file(self.key(CHECK_OBJECT), b"catdog\n")
        except StoreError as error:  # (a StoreFault: this is before any work)
            raise StoreError(str(error)) from None
        except Exception as error:
            raise self.explain(error) from None

    def explain(self, error: BaseException) -> StoreError:
        endpoint = os.environ.get("AWS_ENDPOINT_URL") if self.scheme == "s3" else None
        where = f"{self.flag} {self.url}" + (f" (endpoint {endpoint})" if endpoint else "")
        if isinstance(error, FileNotFoundError):
            return StoreError(
                f"{where}: the bucket {self.bucket!r} does not exist; create it or fix the URL"
            )
        if isinstance(error, PermissionError):
            return StoreError(
                f"{where}: the store refused the credentials ({_reason(error)}); check "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the profile in use)"
            )
        name = type(error).__name__
        if "Credentials" in name:
            return StoreError(
                f"{where}: no credentials found for the store; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        return StoreError(f"{where}: the store did not answer ({name}: {_reason(error)})")

    # Objects -----------------------------------------------------------------------------

    def exists(self, relative: str) -> bool:
        return bool(self.fs.exists(self.key(relative)))

    def upload(self, local: Path, relative: str, *, create: bool = False) -> bool:
        """Copy a local file to the store; with `create`, only if the object does not exist
        yet (S3's `If-None-Match: *`). Returns False when `create` found it there."""
        try:
            self.fs.put_file(
                str(local), self.key(relative), mode="create" if create else "overwrite"
            )
        except OSError as error:
            if create and _lost_a_condition(error):
                return False
            raise
        return True

    def download(self, relative: str, local: Path) -> bool:
        """Copy an object to `local` through a temporary name beside it; False if there is no
        such object."""
        local.parent.mkdir(parents=True, exist_ok=True)
        staged = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
        try:
            self.fs.get_file(self.key(relative), str(staged))
        except FileNotFoundError:
            staged.unlink(missing_ok=True)
            return False
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        staged.replace(local)
        return True

    def read_json(self, relative: str) -> tuple[Any, str] | None:
        """An object's JSON and its ETag; None if there is no such object."""
        try:
            with self.fs.open(self.key(relative), "rb", cache_type="none") as handle:
                etag = str(handle.details.get("ETag", ""))
                data = handle.read()  # read with If-Match: the version whose ETag is kept
        except FileNotFoundError:
            return None
        except OSError as error:
            if type(error).__name__ == "FileExpired":  # changed between the look and the read
                raise StoreConflict(f"{self.key(relative)} changed meanwhile") from error
            raise
        return json.loads(data), etag

    def write_json(self, relative: str, value: Any, *, if_match: str | None) -> str:
        """Write JSON only if the object is still as read: `if_match` its ETag then, or None
        when it did not exist (S3's `If-Match` / `If-None-Match: *`). Returns the ETag of
        what it wrote.

        Raises:
            StoreConflict: Another writer changed it first.
        """
        data = json_bytes(value)
        try:
            if if_match is None:
                written = self.fs.pipe_file(self.key(relative), data, mode="create")
            else:
                written = self.fs.pipe_file(self.key(relative), data, IfMatch=if_match)
        except OSError as error:
            if _lost_a_condition(error) or isinstance(error, FileNotFoundError):
                raise StoreConflict(f"{self.key(relative)} changed meanwhile") from error
            raise
        return str((written or {}).get("ETag", ""))

    def put_many(self, root: Path, paths: list[Path]) -> None:
        """Upload local files under `root` to the same relative names, concurrently."""
        if paths:
            remote = [self.key(path.relative_to(root).as_posix()) for path in paths]
            self.put_files([str(path) for path in paths], remote)

    def put_files(self, local: list[str], remote: list[str]) -> None:
        """Upload local files to store keys, a few at a time, in bounded parts."""
        self.fs.put(local, remote, chunksize=UPLOAD_PART, batch_size=UPLOAD_FILES)

    def get_many(self, wanted: dict[str, Path]) -> None:
        """Download objects (relative name -> local path) concurrently; each local file appears
        whole, under a temporary name first.

        Raises:
            FileNotFoundError: One of them is not in the store (none of those still on their
                way is placed; those already placed stay).
            StoreError: A name that is not a path inside the artifacts.
        """
        if not wanted:
            return
        for relative in wanted:
            safe_relative(relative)
        staged = {
            relative: local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
            for relative, local in wanted.items()
        }
        for path in staged.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fs.get([self.key(name) for name in staged], [str(p) for p in staged.values()])
            for relative, path in staged.items():
                if not path.is_file():
                    raise FileNotFoundError(self.key(relative))
                path.replace(wanted[relative])
        finally:
            for path in staged.values():
                path.unlink(missing_ok=True)

    def details(self, relative: str = "") -> dict[str, dict[str, Any]]:
        """Every object at or under `relative` (all of the artifacts by default), by relative
        name, with what the store says of it (for S3: `ETag`, `size`, `LastModified`)."""
        try:
            found = self.fs.find(self.key(relative) if relative else self.base, detail=True,
                                 refresh=True)  # fmt: skip
        except FileNotFoundError:
            return {}
        start = len(self.base) + 1
        # A folder whose last object was deleted may still be listed, as a directory.
        return {
            name[start:]: info
            for name, info in found.items()
            if info.get("type") != "directory" and len(name) > start
        }

    def list(self, relative: str) -> list[str]:
        """The objects at or under `relative`, by relative name ([] if none)."""
        return [*self.details(relative)]

    def listing(self, relative: str = "") -> dict[str, StoredObject]:
        """Every object at or under `relative` (all of the artifacts by default), by relative
        name, with its size and when it was written."""
        return {
            name: StoredObject(int(info.get("size") or 0), _modified(info))
            for name, info in self.details(relative).items()
        }

    def pipe(self, relative: str, value: Any) -> None:
        """Write JSON to an object, whatever was there."""
        data = json_bytes(value)
        self.fs.pipe_file(self.key(relative), data)

    def delete_tree(self, relative: str) -> None:
        """Remove every object under `relative`."""
        self.delete_objects(tuple(self.list(relative)))

    def delete_objects(self, names: tuple[str, ...]) -> None:
        """Remove objects by relative name (at once: callers order what must go first)."""
        if names:
            self.fs.rm([self.key(name) for name in names])

    def delete(self, relative: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.key(relative))


OBJECT_SCHEMES = ("s3", "gs", "gcs", "az", "abfs")  # where `--data` may name an object


# When a call of this process last found each store (by URL) not answering.
_LAST_FAULT: dict[str, float] = {}
FAULT_MEMORY_SECONDS = 60.0


class _Explained:
    """A filesystem whose calls raise StoreFault, in `explain`'s words, when the store did
    not answer."""

    def __init__(
        self, filesystem: Any, explain: Callable[[BaseException], StoreError], url: str
    ) -> None:
        self._filesystem = filesystem
        self._explain = explain
        self._url = url

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._filesystem, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return value(*args, **kwargs)
            except _no_answer_errors() as error:
                _LAST_FAULT[self._url] = time.monotonic()
                raise StoreFault(str(self._explain(error))) from error

        return call


@functools.cache
def _no_answer_errors() -> tuple[type[BaseException], ...]:
    """What a filesystem raises when its store did not answer (as against: answered no)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError  # endpoints, timeouts, credentials

        errors.append(BotoCoreError)
    return tuple(errors)


def is_object_url(location: str) -> bool:
    """True for `s3://bucket/key` and its kin: an object in a store, read with fsspec."""
    parts = urlsplit(location)
    return parts.scheme.lower() in OBJECT_SCHEMES and bool(parts.netloc)


def object_filesystem(url: str) -> tuple[Any, str]:
    """The filesystem that holds the object at `url`, and its path there."""
    scheme = urlsplit(url).scheme.lower()
    try:
        fs = _filesystem(scheme, _settings_in_environment())
    except (ImportError, ValueError) as error:
        raise StoreError(
            f"{url}: no filesystem for {scheme}:// is installed ({error}); for S3 install "
            "s3fs (pip install 'catdog[s3]')"
        ) from error
    parts = urlsplit(url)
    return fs, f"{parts.netloc}{parts.path}"


def _settings_in_environment() -> tuple[tuple[str, str], ...]:
    """The variables a filesystem reads its credentials and endpoint from, as they are now."""
    return tuple(
        sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "AZURE_")))
    )


@functools.lru_cache(maxsize=8)
def _filesystem(scheme: str, settings: tuple[tuple[str, str], ...]) -> Any:
    """One filesystem per protocol and credentials: fsspec's own instance cache would hand a
    filesystem made with other credentials (its key is the arguments, not the environment)."""
    import fsspec

    return fsspec.filesystem(scheme, skip_instance_cache=True, **_OPTIONS.get(scheme, {}))


def _lost_a_condition(error: OSError) -> bool:
    """Whether a conditional write failed because its condition did not hold (HTTP 412, or
    AWS's 409 for a concurrent conditional write), not for another reason s3fs also reports
    as EINVAL (a request the store rejects)."""
    if isinstance(error, FileExistsError):
        return True
    cause = error.__cause__
    response = getattr(cause, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def safe_relative(name: str) -> str:
    """`name` from the store (a key, a record's file), refused if it could leave the folder it
    is joined to: an absolute name, or one with `..`.

    Raises:
        StoreError: A name that points elsewhere (a damaged or hostile store).
    """
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or "" in parts or "\\" in name:
        raise StoreError(f"the store names {name!r}: not a path inside the artifacts")
    return name


def _modified(info: dict[str, Any]) -> float:
    """When an object was written, from a listing's details (S3: `LastModified`)."""
    found = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    if hasattr(found, "timestamp"):
        return float(found.timestamp())
    return float(found) if isinstance(found, int | float) else 0.0


def _reason(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
