"""Registry storage on an fsspec URL (s3://, memory://, ...), for registries shared by several servers.

Reading works on any fsspec filesystem. Writing needs the one primitive publishing is built on, an
atomic create-if-absent (registry/storage.py), so it is offered only where it is real:

* ``s3://``: a conditional PUT with ``If-None-Match: *`` (s3fs's ``pipe_file(mode="create")``).
  S3 stores the object only if the key does not exist and otherwise answers 412 Precondition
  Failed, which s3fs raises as FileExistsError; of two racing creators exactly one wins. The
  endpoint and credentials come from the standard AWS environment variables (AWS_ENDPOINT_URL or
  AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...), which botocore reads itself. An S3-compatible
  store must implement conditional writes (AWS does since 2024-08): one that silently ignores the
  header would let two publishers of a generation both "win".
* ``memory://``: the filesystem lives in this process, so a process-wide lock makes
  check-then-write atomic.

Listings are never served from s3fs's directory cache: servers poll the registry for generations
that other processes publish, so the cache is invalidated before every listing or lookup and after
every write.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, Sequence

import fsspec
from fsspec import AbstractFileSystem

from .errors import MaskbankError, RegistryError, RegistryUnreachable

Creator = Callable[[AbstractFileSystem, str, bytes], bool]

_BUCKETED = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")  # schemes whose URL starts with a bucket/container
_MEMORY_LOCK = threading.Lock()  # one per process: so is the memory filesystem
_CONFLICT_RETRIES = 5  # S3 answers 409 ConditionalRequestConflict while a racing write is in flight
S3FS_TRIES = 2  # s3fs's own tries of a call (_s3_options)
S3_TIMEOUTS = {"connect_timeout": ("MASKBANK_S3_CONNECT_TIMEOUT", 5.0), "read_timeout": ("MASKBANK_S3_READ_TIMEOUT", 5.0)}


def _s3_options() -> dict[str, Any]:
    """s3fs's options for a store that may hang rather than refuse: botocore waits 60 s per connect and
    per read and retries each up to 5 times, and s3fs retries timeouts 5 times more, so a stalled endpoint
    held a server's registry poll (and any call reading the registry) for many minutes, unlogged.
    Here: connect 5 s, each socket read 5 s (MASKBANK_S3_CONNECT_TIMEOUT / MASKBANK_S3_READ_TIMEOUT),
    botocore's standard retry mode with AWS_MAX_ATTEMPTS (3) attempts, and s3fs's own loop (which also
    retries a body cut off mid-read) down to 2 tries: a stalled store is an error within about a minute."""
    timeouts = {}
    for key, (variable, default) in S3_TIMEOUTS.items():
        try:
            timeouts[key] = float(os.environ.get(variable, default))
        except ValueError:
            raise RegistryError(f"{variable} must be a number of seconds, got {os.environ[variable]!r}") from None
        if not timeouts[key] > 0:
            raise RegistryError(f"{variable} must be a positive number of seconds, got {os.environ[variable]!r}")
    attempts = os.environ.get("AWS_MAX_ATTEMPTS", "3")
    if not attempts.isdigit() or int(attempts) < 1:
        raise RegistryError(f"AWS_MAX_ATTEMPTS must be a whole number of attempts >= 1, got {attempts!r}")
    retries = {"mode": os.environ.get("AWS_RETRY_MODE", "standard"), "max_attempts": int(attempts)}
    return {"config_kwargs": {**timeouts, "retries": retries}}


# Python's own OSErrors that say something about the object asked for, which callers act on (a PermissionError:
# a 403 on one object, its KMS key or a policy on its prefix; verify names it, a server takes its task out of
# service). Other OSErrors from a store are the store's answer about itself: s3fs turns S3's 503 SlowDown
# (throttling) into OSError(EBUSY), which read as a damaged file. A 403 on the registry itself (its listing,
# the bucket: credentials the store rejects) is said as such (`_reaching`'s registry_wide).
_ABOUT_THE_OBJECT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError)


def _reaching(method=None, *, registry_wide: bool = False):
    """`method` with the storage client's own failures (botocore's NoCredentialsError, a read that timed
    out, S3 throttling: the caller cannot act on a library's exception type or errno) raised as
    RegistryUnreachable naming the registry. Python's own errors about the object (_ABOUT_THE_OBJECT) and
    NotImplementedError (a store without that call: fsspec's HTTP has no `modified`) keep their meaning for
    callers and pass as they are, except a PermissionError on a `registry_wide` call (its listing, its
    bucket: every command's first call), which says the store refused the credentials (a bare "Forbidden",
    with a damaged registry's status, before)."""
    if method is None:
        return functools.partial(_reaching, registry_wide=registry_wide)

    @functools.wraps(method)
    def reaching(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except MaskbankError:
            raise
        except Exception as error:  # noqa: BLE001  any client library's failure, reported with its words
            refused = registry_wide and isinstance(error, PermissionError)
            if not refused and (isinstance(error, NotImplementedError) or (
                    isinstance(error, _ABOUT_THE_OBJECT) and type(error).__module__ == "builtins")):
                raise
            hint = ": the store refused these credentials, or they lack permission for it" if refused else ""
            raise RegistryUnreachable(f"cannot reach registry {self.url}: {type(error).__name__}: {error}{hint}") from error

    return reaching


class FsspecStorage:
    """The `Storage` protocol (registry/storage.py) over `fsspec.core.url_to_fs(url)`."""

    def __init__(self, url: str):
        self.scheme, _, path = url.partition("://")
        self.url = f"{self.scheme}://{path.rstrip('/')}"  # "s3://" stays itself (stripping made it "s3:")
        s3 = self.scheme in ("s3", "s3a")
        if s3 and (not path.strip("/") or path.startswith("/")):  # s3:///r: s3fs read it as bucket 'r'
            raise RegistryError(f"registry {url} names no bucket: give s3://BUCKET or s3://BUCKET/PREFIX")
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **(_s3_options() if s3 else {}))
        except (ValueError, ImportError) as error:  # an unknown scheme, or its package not installed
            raise RegistryError(f"cannot open registry {self.url}: {error}") from error
        if s3:
            self.fs.retries = S3FS_TRIES  # its loop wraps botocore's: tries multiply
        self.root = root.rstrip("/")
        self._creator = _creator_for(self.fs)

    def __repr__(self) -> str:
        return f"FsspecStorage({self.url!r})"

    def describe(self, key: str) -> str:
        """The full URL of `key`, for error messages."""
        return f"{self.url}/{key}"

    @_reaching
    def read(self, key: str) -> bytes:
        """The object's bytes (one whole-object GET); FileNotFoundError if absent."""
        return self.fs.cat_file(self._path(key))

    @_reaching
    def write(self, key: str, data: bytes) -> None:
        """Replace the object as a whole (an S3 PUT is atomic: readers never see part of it)."""
        self._require_writable()
        path = self._path(key)
        try:
            self.fs.pipe_file(path, data)
        finally:
            self.fs.invalidate_cache(path)

    @_reaching
    def create(self, key: str, data: bytes) -> bool:
        """Write the object only if `key` does not exist yet; True if this call created it.
        Atomic with respect to other creators, in this process or any other."""
        self._require_writable()
        path = self._path(key)
        try:
            return self._creator(self.fs, path, data)
        finally:
            self.fs.invalidate_cache(path)

    @_reaching
    def exists(self, key: str) -> bool:
        path = self._fresh(key)
        return self.fs.exists(path)

    @_reaching
    def delete(self, key: str) -> None:
        """Remove the object; a missing one is not an error."""
        path = self._path(key)
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        finally:
            self.fs.invalidate_cache(path)

    @_reaching(registry_wide=True)
    def list_dir(self, prefix: str) -> list[str]:
        """Sorted names (last path component) directly below `prefix`; [] if there are none."""
        path = self._fresh(prefix)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        names = (_last_component(entry) for entry in entries if entry.rstrip("/") != path)
        return sorted(name for name in names if name)

    def leftovers(self, prefix: str) -> list[str]:
        """None: an object store writes whole objects without temporaries."""
        return []

    @_reaching
    def write_problem(self, folders: Sequence[str] = ()) -> str | None:
        """None: whether an object store can be written shows at the first write (trying would need
        an object of its own)."""
        return None

    @_reaching(registry_wide=True)
    def location_problem(self, must_exist: bool) -> str | None:
        """A bucket that does not exist (object stores), or with `must_exist` nothing under the URL, an
        object there, or a prefix holding other things than a registry (a mistyped prefix verified OK)."""
        bucket = self.root.split("/", 1)[0]
        self.fs.invalidate_cache()
        if self.scheme in _BUCKETED and bucket:
            try:
                self.fs.info(bucket)  # not exists(): s3fs answers False for missing credentials too
            except FileNotFoundError:
                return f"bucket '{bucket}' does not exist, or these credentials cannot see it"
        if not must_exist:
            return None
        if self.fs.isfile(self.root):
            return "it is an object, not a prefix holding one (is it the right URL?)"
        names = self.list_dir("")
        if not names:
            return "nothing is stored under it (the first publish, `maskbank train --registry ...`, creates it)"
        if not {"models", "blobs"} & set(names):
            return "it holds other things and no models/ or blobs/ (is it the right prefix?)"
        return None

    @_reaching
    def modified(self, key: str) -> float:
        """When the object was last written, as a POSIX timestamp."""
        return _timestamp(self.fs.modified(self._fresh(key)))

    @_reaching
    def version(self, key: str) -> tuple:
        """Size and ETag, from one metadata request (a HEAD on object storage): an ETag is the content's
        digest, so a rewrite shows even within the 1 s resolution of S3's modification times. A store
        without ETags: size and modification time (NotImplementedError where it has no time either:
        fsspec's HTTP)."""
        path = self._fresh(key)
        info = self.fs.info(path)
        tag = info.get("ETag") or info.get("etag")
        return (int(info["size"]), tag) if tag else (int(info["size"]), _timestamp(self.fs.modified(path)))

    @_reaching
    def size(self, key: str) -> int:
        """The object's size in bytes, from its metadata (a HEAD on object storage); IsADirectoryError
        for a "folder" (objects under `key/`), which s3fs sizes as 0 bytes."""
        path = self._fresh(key)
        info = self.fs.info(path)
        if info.get("type") == "directory":
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), self.describe(key))
        return int(info["size"])

    def _path(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.root}/{key}" if self.root else key

    def _fresh(self, key: str) -> str:
        """The path of `key`, with any cached listing of it or its parents dropped."""
        path = self._path(key)
        self.fs.invalidate_cache(path)
        return path

    def _require_writable(self) -> None:
        if self._creator is None:
            raise RegistryError(
                f"cannot publish to {self.url}: publishing to {self.scheme}:// is not supported, because "
                "this backend offers no atomic create-if-absent for the manifest compare-and-swap "
                f"(reading works; publishing works on {', '.join(_supported())} and local directories)"
            )


def _create_s3(fs: AbstractFileSystem, path: str, data: bytes) -> bool:
    """A conditional PUT (If-None-Match: *): False when the object already exists (412).
    A 409 ConditionalRequestConflict (another write to the key still in flight) is retried."""
    for attempt in range(_CONFLICT_RETRIES):
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as error:
            code, status = _s3_error(error)
            if code == "PreconditionFailed" or status == 412:
                return False  # only If-None-Match was sent: the object exists
            if (code != "ConditionalRequestConflict" and status != 409) or attempt == _CONFLICT_RETRIES - 1:
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


def _create_memory(fs: AbstractFileSystem, path: str, data: bytes) -> bool:
    """Check-then-write under a process-wide lock (the memory filesystem is process-local)."""
    with _MEMORY_LOCK:
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True


_CREATORS: dict[str, Creator] = {"s3": _create_s3, "s3a": _create_s3, "memory": _create_memory}


def _creator_for(fs: AbstractFileSystem) -> Creator | None:
    """The atomic create for this filesystem's protocol, or None if it has none."""
    return next((_CREATORS[p] for p in _protocols(fs) if p in _CREATORS), None)


def _supported() -> list[str]:
    return [f"{p}://" for p in _CREATORS]


def _protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _s3_error(error: BaseException) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status behind an exception s3fs translated from botocore."""
    response: dict[str, Any] = getattr(error.__cause__, "response", None) or getattr(error, "response", None) or {}
    return response.get("Error", {}).get("Code"), response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _last_component(entry: str) -> str:
    return entry.rstrip("/").rsplit("/", 1)[-1]


def _timestamp(value: datetime | float) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value)
