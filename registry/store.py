"""Content-addressed blobs: named by the sha256 of their bytes, verified on every read."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .errors import BlobCorrupt, BlobNotFound, BlobUnreadable
from .storage import Storage

DIGEST_PREFIX = "sha256:"
BLOB_PREFIX = "blobs/sha256"


def digest_of(data: bytes) -> str:
    """The content address of `data`, e.g. 'sha256:9f86d0...'."""
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


@dataclass
class BlobInventory:
    """The blob folder's listing, sorted into blobs, stray keys and temporaries (BlobStore.inventory)."""

    digests: list[str] = field(default_factory=list)
    strays: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    unlisted: dict[str, str] = field(default_factory=dict)  # folder -> why the system would not list it


class BlobStore:
    """Immutable blobs under `blobs/sha256/ab/abcdef...` of a storage backend."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def key(self, digest: str) -> str:
        hexdigest = self._hex(digest)
        return f"{BLOB_PREFIX}/{hexdigest[:2]}/{hexdigest}"

    def describe(self, digest: str) -> str:
        return self.storage.describe(self.key(digest))

    def put(self, data: bytes) -> str:
        """Store `data` and return its digest. Idempotent; it always writes, so that a blob
        about to be referenced again is fresh and `gc`'s grace period protects it."""
        digest = digest_of(data)
        self.storage.write(self.key(digest), data)
        return digest

    def get(self, digest: str) -> bytes:
        """The bytes of `digest`, verified: a mismatch raises BlobCorrupt naming the object."""
        try:
            data = self.storage.read(self.key(digest))
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest} is missing (expected at {self.describe(digest)})") from None
        except OSError as error:  # the system's own (RegistryUnreachable is no OSError): this blob, not the registry
            raise BlobUnreadable(f"blob {digest} at {self.describe(digest)} cannot be read ({error.strerror or error}): "
                                 "check its permissions and the disk, or restore it from a backup") from None
        actual = digest_of(data)
        if actual != digest:
            raise BlobCorrupt(
                f"blob {digest} at {self.describe(digest)} is corrupt: its bytes hash to {actual}; "
                "restore it from a backup (`maskbank registry verify` names what uses it)"
            )
        return data

    def exists(self, digest: str) -> bool:
        return self.storage.exists(self.key(digest))

    def digests(self) -> list[str]:
        """Every blob in the store (by listing, not by reading); what is no blob is left out (`inventory`)."""
        return self.inventory().digests

    def inventory(self) -> "BlobInventory":
        """What the blob folder holds, from one listing of each shard: the blobs, the keys that name no
        blob (a README, .DS_Store, a sync tool's files, at any of its levels: maintenance reports them
        and never reads or deletes them), and the temporary files of killed writes (local directories)."""
        found = BlobInventory()
        found.strays += [f"blobs/{name}" for name in self._listing("blobs", found) if f"blobs/{name}" != BLOB_PREFIX]
        shards = self._listing(BLOB_PREFIX, found)
        found.strays += [f"{BLOB_PREFIX}/{shard}" for shard in shards if not _is_shard_name(shard)]
        for shard in filter(_is_shard_name, shards):
            folder = f"{BLOB_PREFIX}/{shard}"
            for name in self._listing(folder, found):
                if _is_blob_name(shard, name):
                    found.digests.append(DIGEST_PREFIX + name)
                else:
                    found.strays.append(f"{folder}/{name}")
            found.leftovers += self.storage.leftovers(folder)  # none where the folder cannot be listed
        return found

    def _listing(self, folder: str, found: BlobInventory) -> list[str]:
        """`folder`'s names, or none, with why in `found.unlisted`, where the system will not list it (no
        permission): one folder is one problem for maintenance, not the end of its check."""
        try:
            return self.storage.list_dir(folder)
        except OSError as error:  # the system's own (RegistryUnreachable, the registry's, is no OSError)
            found.unlisted[folder] = error.strerror or str(error)
            return []

    def delete(self, digest: str) -> None:
        self.storage.delete(self.key(digest))

    @staticmethod
    def _hex(digest: str) -> str:
        if not is_digest(digest):
            raise BlobCorrupt(f"malformed blob reference {digest!r}: expected 'sha256:' and 64 hex digits")
        return digest.removeprefix(DIGEST_PREFIX)


def is_digest(digest: str) -> bool:
    """Whether `digest` is a blob's content address: 'sha256:' and 64 lowercase hex digits."""
    hexdigest = digest.removeprefix(DIGEST_PREFIX)
    return digest.startswith(DIGEST_PREFIX) and len(hexdigest) == 64 and all(c in "0123456789abcdef" for c in hexdigest)


def _is_shard_name(name: str) -> bool:
    """Whether `name` directly under blobs/sha256 is a shard folder: two hex digits."""
    return len(name) == 2 and all(c in "0123456789abcdef" for c in name)


def _is_blob_name(shard: str, name: str) -> bool:
    """Whether `shard/name` under the blob folder is where a blob lives: 64 hex digits, the first two its shard."""
    return name[:2] == shard and is_digest(DIGEST_PREFIX + name)
