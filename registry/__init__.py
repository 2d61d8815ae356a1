"""maskbank's registry: artifact format, content-addressed store, codecs, architectures and
materialisation. It imports neither trainer nor serving; both build on it."""

from . import mask_coding  # noqa: F401  (registers the entropy-mask/v1 codec)
from .architectures import build_architecture, maskable_parameters, register_architecture
from .catalog import Registry
from .errors import (
    BlobCorrupt,
    BlobUndecodable,
    BlobNotFound,
    BlobUnreadable,
    InvalidArtifact,
    InvalidName,
    MaskbankError,
    ManifestError,
    ModelNotFound,
    PublishConflict,
    RegistryError,
    RegistryUnreachable,
    TaskNotFound,
    UnknownName,
)
from .manifest import FORMAT_VERSION, BackboneVersion, BlobRef, Manifest, TaskEntry, label_problem
from .materialize import effective_parameters, forward, head_input, head_name, materialization, register_materializer, served_backbone
from .packed import PackedMasks

__all__ = [
    "FORMAT_VERSION",
    "BackboneVersion",
    "BlobCorrupt",
    "BlobUndecodable",
    "BlobNotFound",
    "BlobUnreadable",
    "BlobRef",
    "InvalidArtifact",
    "InvalidName",
    "Manifest",
    "ManifestError",
    "MaskbankError",
    "ModelNotFound",
    "PackedMasks",
    "PublishConflict",
    "Registry",
    "RegistryError",
    "RegistryUnreachable",
    "TaskEntry",
    "TaskNotFound",
    "UnknownName",
    "build_architecture",
    "effective_parameters",
    "forward",
    "head_input",
    "head_name",
    "label_problem",
    "materialization",
    "maskable_parameters",
    "register_architecture",
    "register_materializer",
    "served_backbone",
]
