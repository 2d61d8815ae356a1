"""Content-addressed blob store on a local directory: sha256 names, verified on every read."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .errors import BlobCorrupt, BlobNotFound

DIGEST_PREFIX = "sha256:"


def digest_of(data: bytes) -> str:
    """The content address of `data`, e.g. 'sha256:9f86d0...'."""
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file, the new one, or none: never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Make a rename or link inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Immutable blobs under `root/blobs/sha256/ab/abcdef...`, named by the sha256 of their bytes."""

    def __init__(self, root: Path):
        self.root = Path(root) / "blobs" / "sha256"

    def path(self, digest: str) -> Path:
        hexdigest = self._hex(digest)
        return self.root / hexdigest[:2] / hexdigest

    def put(self, data: bytes) -> str:
        """Store `data` (idempotent) and return its digest."""
        digest = digest_of(data)
        path = self.path(digest)
        if not path.exists():
            write_atomically(path, data)
        return digest

    def get(self, digest: str) -> bytes:
        """Return the bytes of `digest`, verified: a mismatch raises BlobCorrupt naming the file."""
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest} is missing from {self.root} (expected at {path})") from None
        actual = digest_of(data)
        if actual != digest:
            raise BlobCorrupt(
                f"blob {digest} at {path} is corrupt: its bytes hash to {actual}; "
                "restore the file from a backup or republish the task that wrote it"
            )
        return data

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    @staticmethod
    def _hex(digest: str) -> str:
        hexdigest = digest.removeprefix(DIGEST_PREFIX)
        if not digest.startswith(DIGEST_PREFIX) or len(hexdigest) != 64 or not all(
            c in "0123456789abcdef" for c in hexdigest
        ):
            raise BlobCorrupt(f"malformed blob reference {digest!r}: expected 'sha256:' and 64 hex digits")
        return hexdigest
