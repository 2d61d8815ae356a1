"""The registry on a local directory: blobs, and one manifest file per model generation.

Layout::

    ROOT/blobs/sha256/ab/ab12...            immutable, content-addressed
    ROOT/models/MODEL/generations/0000000007.json

A generation file is written to a temporary name, flushed, then hard-linked to its final name;
the link fails if that generation exists, which makes publishing a compare-and-swap on the
generation: of two publishers of generation g+1, exactly one wins and the other gets
PublishConflict. Blobs are always written before the manifest that references them, so a reader
sees the old or the new generation, never a mix, and a publisher killed at any point leaves the
registry at one or the other (stray temporary files and unreferenced blobs are harmless).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from . import codecs
from .errors import ModelNotFound, PublishConflict
from .manifest import BlobRef, Manifest
from .names import check_name
from .store import BlobStore, fsync_directory

_GENERATION_FILE = re.compile(r"(\d{10})\.json")


class Registry:
    """A model registry rooted at a local directory (created on first publish)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.blobs = BlobStore(self.root)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    def list_models(self) -> list[str]:
        models = self.root / "models"
        return sorted(p.name for p in models.iterdir() if p.is_dir()) if models.is_dir() else []

    def generations(self, model: str) -> list[int]:
        """All published generations of `model`, oldest first ([] if none)."""
        folder = self._generations_dir(model)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _GENERATION_FILE.fullmatch(p.name)))

    def latest_generation(self, model: str) -> int:
        """The newest generation of `model`, or 0 when it has none."""
        generations = self.generations(model)
        return generations[-1] if generations else 0

    def manifest(self, model: str, generation: int | None = None) -> Manifest:
        """Read and verify one generation of `model` (the newest by default)."""
        generation = generation or self.latest_generation(model)
        path = self._generations_dir(model) / f"{generation:010d}.json"
        if generation == 0 or not path.exists():
            known = ", ".join(self.list_models()) or "none"
            what = f"model '{model}'" if generation == 0 else f"generation {generation} of model '{model}'"
            raise ModelNotFound(f"registry {self.root} has no {what} (models: {known})")
        return Manifest.from_json(path.read_bytes(), source=str(path))

    def find_manifest(self, model: str) -> Manifest | None:
        """The newest manifest of `model`, or None if it was never published."""
        return self.manifest(model) if self.latest_generation(model) else None

    def commit(self, manifest: Manifest) -> Manifest:
        """Publish `manifest` as its generation, which must be the next one (compare-and-swap)."""
        folder = self._generations_dir(manifest.model)
        folder.mkdir(parents=True, exist_ok=True)
        for ref in (*manifest.backbones.values(), *(p for t in manifest.tasks for p in t.parts.values())):
            self.blobs.path(ref.digest).stat()  # every referenced blob exists before the manifest does
        final = folder / f"{manifest.generation:010d}.json"
        expected = self.latest_generation(manifest.model) + 1
        if manifest.generation != expected:
            raise PublishConflict(self._conflict(manifest, expected - 1))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(manifest.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, final)
        except FileExistsError:
            raise PublishConflict(self._conflict(manifest, self.latest_generation(manifest.model))) from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        fsync_directory(folder)
        return manifest

    def put(self, codec: str, value: Any) -> BlobRef:
        """Encode `value` with `codec`, store it, and return the reference a manifest records."""
        data = codecs.encode(codec, value)
        return BlobRef(digest=self.blobs.put(data), codec=codec, size=len(data))

    def load(self, ref: BlobRef) -> Any:
        """Read, verify and decode the blob behind `ref`."""
        return codecs.decode(ref.codec, self.blobs.get(ref.digest), source=ref.digest)

    def _generations_dir(self, model: str) -> Path:
        return self.root / "models" / check_name("model", model) / "generations"

    @staticmethod
    def _conflict(manifest: Manifest, latest: int) -> str:
        return (
            f"model '{manifest.model}': generation {manifest.generation} cannot be published because the "
            f"registry is at generation {latest}; another publisher got there first: reload and retry"
        )
