"""The typed errors of maskbank. Serving maps each class to one gRPC status (serving/status.py)."""


class MaskbankError(Exception):
    """Base of every error maskbank raises on purpose; its message is written for a person."""


class RegistryError(MaskbankError):
    """Something in the registry is missing, malformed or inconsistent."""


class RegistryUnreachable(RegistryError):
    """The registry's store did not answer (no route, refused, timed out, no credentials): nothing is
    known about its contents, so a reader retries later rather than judging what it holds."""


class InvalidName(RegistryError):
    """A model or task name that cannot be used safely as a registry key."""


class ModelNotFound(RegistryError):
    """The registry has no model of that name."""


class TaskNotFound(RegistryError):
    """The model has no task of that id or name."""


class BlobNotFound(RegistryError):
    """A manifest references a blob that the store does not hold."""


class BlobCorrupt(RegistryError):
    """A blob's bytes do not hash to the digest that references it, or cannot be decoded."""


class BlobUndecodable(BlobCorrupt):
    """A blob's bytes hash right but are not what its codec reads (written wrongly, or by another version)."""


class BlobUnreadable(RegistryError):
    """A blob is there but cannot be read: no permission, a folder or a link loop in its place, an I/O error."""


class ManifestError(RegistryError):
    """A manifest is truncated, edited by hand, or of a format this version cannot read."""


class PublishConflict(RegistryError):
    """Another publisher committed the generation this one meant to write."""


class InvalidArtifact(RegistryError):
    """An artifact does not fit its backbone (missing keys, wrong shapes or dtypes)."""


class ExportError(MaskbankError):
    """An export cannot be written where it was asked to go (the folder holds something else)."""


class UnknownName(MaskbankError, KeyError):
    """A name looked up in one of maskbank's registries (architectures, codecs, methods...)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def unknown(kind: str, name: str, known) -> UnknownName:
    """Build the one error message used for every unknown registered name."""
    return UnknownName(f"Unknown {kind} '{name}' (known: {', '.join(sorted(known))})")
