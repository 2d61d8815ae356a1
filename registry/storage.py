"""Where registry bytes live: a small key-value interface with one atomic primitive.

Keys are '/'-separated relative paths ('blobs/sha256/ab/ab12...', 'models/m/generations/...').
Every backend provides:

* `write(key, data)`: a whole-object write: a reader sees the old object, the new one, or none;
* `create(key, data) -> bool`: the same, but only if `key` does not exist yet, atomically with
  respect to other creators (the compare-and-swap that publishing is built on);
* `read`, `exists`, `delete`, `list_dir` (names directly below a prefix), `modified` (a POSIX time),
  `version` (a token that changes with every write), `size`.

`open_storage(location)` picks the backend: a plain path (or file://) is a local directory; any
other fsspec URL (s3://, memory://, ...) goes through registry/fsspec_storage.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, Sequence

from .errors import RegistryError
from .folders import file_in_the_way, first_missing

MOVE_ATTEMPTS = 3  # a temporary file written and moved in, as often as a concurrent gc may delete it


class Storage(Protocol):
    def describe(self, key: str) -> str:
        """Where `key` lives, for error messages (a path or URL)."""

    def read(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError if absent."""

    def write(self, key: str, data: bytes) -> None: ...

    def create(self, key: str, data: bytes) -> bool: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def list_dir(self, prefix: str) -> list[str]: ...

    def modified(self, key: str) -> float: ...

    def version(self, key: str) -> tuple:
        """A token that changes whenever the object is written again, from its metadata (nothing
        read; one request on object storage); NotImplementedError where the store cannot tell."""

    def size(self, key: str) -> int:
        """The object's size in bytes, from its metadata (nothing read); IsADirectoryError for a folder."""

    def location_problem(self, must_exist: bool) -> str | None:
        """Why no registry can be at this location (an S3 bucket that does not exist), or, with
        `must_exist`, why none is there yet (nothing stored); None if all is well."""

    def write_problem(self, folders: Sequence[str] = ()) -> str | None:
        """Why nothing can be written there, or in `folders` (keys of folders a publish writes into, looked
        at where they exist), where that can be told without writing a registry's object (a local folder:
        a file in its path, no permission, a read-only system); None if none."""

    def leftovers(self, prefix: str) -> list[str]:
        """Keys of the temporary objects a killed writer left directly below `prefix` (invisible to
        `list_dir`); none where whole-object writes need no temporary (object stores)."""


def open_storage(location: str | os.PathLike) -> Storage:
    """The storage backend for a registry location (a directory path or an fsspec URL)."""
    text = os.fspath(location)
    if "://" in text and not text.startswith("file://"):
        from .fsspec_storage import FsspecStorage

        return FsspecStorage(text)
    return LocalStorage(Path(text.removeprefix("file://")))


class LocalStorage:
    """A directory. Writes go to a temporary file that is flushed, then renamed (write) or
    hard-linked (create: the link fails if the name exists, so exactly one creator wins)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():  # else every command fails later, on some inner path
            raise RegistryError(f"registry {self.root} is a file, not a directory: give a directory (created on the "
                                "first publish) or an fsspec URL")

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def describe(self, key: str) -> str:
        return str(self.root / key)

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        path = self.root / key
        self._move_in(path, data, os.replace)
        _fsync_directory(path.parent)

    def create(self, key: str, data: bytes) -> bool:
        path = self.root / key
        try:
            self._move_in(path, data, os.link)
        except FileExistsError:
            return False
        _fsync_directory(path.parent)
        return True

    def _move_in(self, path: Path, data: bytes, move: Callable[[Path, Path], None]) -> None:
        """`data` written to a temporary beside `path`, then moved there by `move` (os.replace, or
        os.link, which refuses a file that exists). A temporary deleted before the move (by `registry gc
        --grace-seconds 0` running meanwhile) is written again, twice at most."""
        for _ in range(MOVE_ATTEMPTS):
            tmp = self._flushed_temporary(path, data)
            try:
                move(tmp, path)
                return
            except FileNotFoundError:
                if tmp.exists():  # something else is missing: not a temporary deleted under the move
                    raise
            finally:
                tmp.unlink(missing_ok=True)
        raise FileNotFoundError(errno.ENOENT, f"the temporary file was deleted before it could be moved in, "
                                f"{MOVE_ATTEMPTS} times (a `maskbank registry gc --grace-seconds 0` running meanwhile?)",
                                str(path))

    def exists(self, key: str) -> bool:
        return (self.root / key).exists()

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def list_dir(self, prefix: str) -> list[str]:
        """The names in folder `prefix`; none where there is no folder (or a file: a stray entry). A link
        that leads nowhere (a loop, an unmounted volume) or a folder the system will not list raises:
        read as empty, gc took every blob of the model behind it for garbage."""
        folder = self.root / prefix
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            if os.path.lexists(folder):  # a dangling link: something was meant to be there
                raise
            return []
        except NotADirectoryError:
            return []
        return sorted(name for name in names if not name.startswith(".tmp-"))

    def modified(self, key: str) -> float:
        return (self.root / key).stat().st_mtime

    def version(self, key: str) -> tuple:
        """Size, time in nanoseconds and inode: a file moved in over the old one (every write here) is a new
        inode, so a rewrite of the same size within the file system's time resolution shows too."""
        info = (self.root / key).stat()
        return info.st_size, info.st_mtime_ns, info.st_ino

    def size(self, key: str) -> int:
        """The file's size; IsADirectoryError for a folder."""
        path = self.root / key
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        return info.st_size

    def location_problem(self, must_exist: bool) -> str | None:
        if must_exist and not self.root.is_dir():
            return "the directory does not exist (the first publish, `maskbank train --registry ...`, creates it)"
        if must_exist and not any((self.root / folder).is_dir() for folder in ("models", "blobs")) and any(
                not (name.startswith(".") or name == "lost+found") for name in os.listdir(self.root)):
            # what a fresh volume or a placeholder holds (lost+found, .keep) is still an empty registry
            return "the directory holds other things and no models/ or blobs/ folder (is it the right path?)"
        return None

    def write_problem(self, folders: Sequence[str] = ()) -> str | None:
        """Found by writing a temporary file in the directory and in each of the folders a publish
        writes into that exist already (a read-only mount over blobs/ alone, a model's folder of
        another owner); what this makes to try goes again."""
        from .store import BLOB_PREFIX  # here: the store builds on this module

        if (problem := file_in_the_way(self.root)) is not None:
            return problem
        created = first_missing(self.root)
        tried = [self.root] + [self.root / f for f in ("models", "blobs", BLOB_PREFIX, *folders) if (self.root / f).is_dir()]
        folder = created or self.root  # the first that making the directory writes into
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for folder in tried:
                with tempfile.TemporaryFile(dir=folder):
                    pass
        except OSError as error:
            where = folder.parent if folder == created else folder
            return f"{where} cannot be written ({error.strerror or error})"
        finally:
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
        return None

    def leftovers(self, prefix: str) -> list[str]:
        """The temporaries in folder `prefix`; none where it cannot be listed (list_dir says why)."""
        try:
            names = os.listdir(self.root / prefix)
        except OSError:
            return []
        return sorted(f"{prefix}/{name}" for name in names if name.startswith(".tmp-"))

    @staticmethod
    def _flushed_temporary(path: Path, data: bytes) -> Path:
        """A new temporary file beside `path` holding `data`, on disk. Created as open() creates files,
        readable as the process's umask allows then (mkstemp made it 0600: a server running as another
        user could not read the registry); a file rewritten in place (a blob a publish reuses) keeps its
        mode, so a writer with a stricter umask does not take it from the others' models."""
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = path.parent / f".tmp-{secrets.token_hex(8)}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                break
            except FileExistsError:  # another writer's temporary of that name: draw again
                continue
        with os.fdopen(fd, "wb") as f:
            with contextlib.suppress(FileNotFoundError):
                os.fchmod(f.fileno(), stat.S_IMODE(path.stat().st_mode))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp


def _fsync_directory(path: Path) -> None:
    """Make a rename or link inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
