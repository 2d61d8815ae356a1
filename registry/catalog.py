"""The registry: blobs plus one manifest object per model generation, on any storage backend.

Layout (keys of registry/storage.py)::

    blobs/sha256/ab/ab12...                   immutable, content-addressed
    models/MODEL/generations/0000000007.json  one checksummed manifest per generation

Publishing writes every blob first, then creates the next generation's manifest with the
storage's atomic create-if-absent: of two publishers of generation g+1 exactly one wins and the
other gets PublishConflict. A reader therefore sees the old or the new generation, never a mix,
and a publisher killed at any point leaves the registry at one or the other (at worst with
unreferenced blobs, which `gc` removes).
"""

from __future__ import annotations

import os
import random
import re
import time
from typing import Any, Callable

import torch

from . import codecs
from .errors import ManifestError, ModelNotFound, PublishConflict, RegistryError, RegistryUnreachable
from .kinds import get_kind
from .manifest import BackboneVersion, BlobRef, Manifest
from .names import check_name
from .storage import open_storage
from .store import BlobStore

_GENERATION_FILE = re.compile(r"(\d{10})\.json")


class Registry:
    """A model registry at a directory path or an fsspec URL (created on first publish)."""

    def __init__(self, location: str | os.PathLike):
        self.location = os.fspath(location)
        self.storage = open_storage(location)
        self.blobs = BlobStore(self.storage)

    def __repr__(self) -> str:
        return f"Registry({self.location!r})"

    def check_location(self, must_exist: bool = True) -> None:
        """RegistryError when no registry can be at this location (an S3 bucket that does not exist)
        or, with `must_exist`, none is there: a mistyped path must not read as an empty registry."""
        if problem := self.storage.location_problem(must_exist):
            raise RegistryError(f"no registry at {self.location}: {problem}")

    def check_writable(self, model: str | None = None) -> None:
        """RegistryError when a local registry, or `model`'s folders in it, cannot be written: before the
        work that would publish (a training), not after it."""
        folders = [self.generations_prefix(model).rpartition("/")[0], self.generations_prefix(model)] if model else []
        if problem := self.storage.write_problem(folders):
            raise RegistryError(f"cannot publish to registry {self.location}: {problem}")

    def list_models(self) -> list[str]:
        """Every entry under models/ (a model, a first publish under way, or a stray file)."""
        return [m for m in self.storage.list_dir("models") if not m.startswith(".")]

    def published_models(self) -> list[str]:
        """The entries under models/ with at least one generation: what messages name as models (one
        listing per entry, so not for hot paths)."""
        return [m for m in self.list_models() if self.latest_generation(m)]

    def generations(self, model: str) -> list[int]:
        """All published generations of `model`, oldest first ([] if none). ManifestError where the system
        will not list them (no permission, a link that leads nowhere): nobody can tell what they are."""
        prefix = self.generations_prefix(model)
        try:
            names = self.storage.list_dir(prefix)
        except OSError as error:  # the system's own (RegistryUnreachable, the registry's, is no OSError)
            raise ManifestError(f"the generations of model '{model}' ({self.storage.describe(prefix)}) cannot be "
                                f"listed ({error.strerror or error}): check that folder (permissions, a link, a "
                                "mount)") from None
        return sorted(int(m.group(1)) for name in names if (m := _GENERATION_FILE.fullmatch(name)))

    def latest_generation(self, model: str) -> int:
        """The newest generation of `model`, or 0 when it has none."""
        generations = self.generations(model)
        return generations[-1] if generations else 0

    def manifest(self, model: str, generation: int | None = None) -> Manifest:
        """Read and verify one generation of `model` (the newest by default)."""
        generation = generation or self.latest_generation(model)
        key = self.manifest_key(model, generation)
        try:
            data = self.storage.read(key) if generation else None
        except FileNotFoundError:
            data = None
        except OSError as error:  # the system's own: this manifest (RegistryUnreachable, the registry, is no OSError)
            raise ManifestError(f"manifest {self.storage.describe(key)} cannot be read ({error.strerror or error}): check "
                                "its permissions and the disk, or restore it from a backup") from None
        if data is None and generation and (generations := self.generations(model)):
            raise ModelNotFound(f"registry {self.location} has no generation {generation} of model '{model}' (its "
                                f"generations: {generations[0]} to {generations[-1]})")
        if data is None:
            known = ", ".join(self.published_models()) or "none"
            what = f"model '{model}'" if generation == 0 else f"generation {generation} of model '{model}'"
            raise ModelNotFound(f"registry {self.location} has no {what} (models: {known})")
        manifest = Manifest.from_json(data, source=self.storage.describe(key))
        if (manifest.model, manifest.generation) != (model, generation):
            raise ManifestError(
                f"manifest {self.storage.describe(key)} describes generation {manifest.generation} of "
                f"'{manifest.model}', not generation {generation} of '{model}': it was copied or renamed"
            )
        return manifest

    def find_manifest(self, model: str) -> Manifest | None:
        """The newest manifest of `model`, or None if it was never published (one listing of its
        generations, not two: on object storage each is a request)."""
        latest = self.latest_generation(model)
        return self.manifest(model, latest) if latest else None

    def commit(self, manifest: Manifest) -> Manifest:
        """Publish `manifest` as its generation, which must be the next one (compare-and-swap)."""
        missing = [ref.digest for ref in manifest.blob_refs() if not self.blobs.exists(ref.digest)]
        if missing:
            raise ManifestError(f"refusing to publish '{manifest.model}': blobs {missing} are not in the registry")
        latest = self.latest_generation(manifest.model)
        if manifest.generation != latest + 1 or not self._created(self.manifest_key(manifest.model, manifest.generation),
                                                                  manifest.to_json()):
            raise PublishConflict(
                f"model '{manifest.model}': generation {manifest.generation} cannot be published because "
                f"the registry is at generation {self.latest_generation(manifest.model)}; another "
                "publisher got there first: reload and retry"
            )
        return manifest

    def _created(self, key: str, data: bytes) -> bool:
        """Create `key` with `data` unless it exists; True if it now holds `data` because of this call. On
        object storage the answer to a create that succeeded can be lost (a dropped connection, a read
        timeout): the client sends it again and gets "exists", or gives up. So where the create says
        "exists" or fails, the object is read back: holding these very bytes, it is this publish's own."""
        try:
            if self.storage.create(key, data):
                return True
        except RegistryUnreachable:
            if not self._holds(key, data):
                raise
            return True
        return self._holds(key, data)

    def _holds(self, key: str, data: bytes) -> bool:
        try:
            return self.storage.read(key) == data
        except (FileNotFoundError, RegistryUnreachable):
            return False

    def publish(self, model: str, change: Callable[[Manifest | None], Manifest], attempts: int = 10) -> Manifest:
        """Commit `change(latest manifest or None)`, rebuilding and retrying on PublishConflict.

        For writers whose change can be recomputed on top of whatever generation won (adding
        an independent task, say); a writer whose work depends on the generation it started
        from (the trainer) uses `commit` and reports the conflict instead.
        """
        for attempt in range(attempts):
            try:
                return self.commit(change(self.find_manifest(model)))
            except PublishConflict:
                if attempt == attempts - 1:
                    raise
                time.sleep(random.uniform(0, 0.05 * 2**attempt))  # de-synchronise the racers
        raise AssertionError("unreachable")

    def put(self, codec: str, value: Any) -> BlobRef:
        """Encode `value` with `codec`, store it, and return the reference a manifest records."""
        return self._put_bytes(codec, codecs.encode(codec, value))

    def load(self, ref: BlobRef) -> Any:
        """Read, verify and decode the blob behind `ref`."""
        return codecs.decode(ref.codec, self.blobs.get(ref.digest), source=f"blob {ref.digest}")

    def put_part(self, kind: str, value: dict[str, torch.Tensor], backbone: dict[str, torch.Tensor]) -> BlobRef:
        """Check a task or shared part of `kind` against `backbone`, then store it with the kind's
        codec (for masks, whichever of the mask codecs is smaller for this value)."""
        spec = get_kind(kind)
        spec.check(value, backbone)
        return self._put_bytes(*codecs.encode_smallest(spec.codecs, value))

    def put_backbone(self, tensors: dict[str, torch.Tensor], codec: str = "tensors/v1",
                     base: tuple[str, dict[str, torch.Tensor]] | None = None) -> BackboneVersion:
        """Store a backbone version in full, or as a sparse delta of `base` = (version, tensors)
        when that is smaller."""
        full = codecs.encode(codec, tensors)
        if base is not None:
            delta = codecs.encode("delta/v1", codecs.sparse_delta(base[1], tensors))
            if len(delta) < len(full):
                return BackboneVersion(self._put_bytes("delta/v1", delta), base=base[0])
        return BackboneVersion(self._put_bytes(codec, full))

    def _put_bytes(self, codec: str, data: bytes) -> BlobRef:
        return BlobRef(digest=self.blobs.put(data), codec=codec, size=len(data))

    def load_backbone(self, manifest: Manifest, version: str) -> dict[str, torch.Tensor]:
        """The full weights of backbone `version`, applying sparse deltas down from their bases."""
        entry = manifest.backbone(version)
        value = self.load(entry.blob)
        if entry.base is None:
            return value
        return codecs.apply_delta(self.load_backbone(manifest, entry.base), value)

    def generations_prefix(self, model: str) -> str:
        """The storage key below which `model`'s manifests live."""
        return f"models/{check_name('model', model)}/generations"

    def manifest_key(self, model: str, generation: int) -> str:
        """The storage key of one generation's manifest."""
        return f"{self.generations_prefix(model)}/{generation:010d}.json"
