"""The per-model manifest: one immutable JSON document per generation, with its own checksum."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from .errors import ManifestError, RegistryError, TaskNotFound
from .materialize import missing_parts
from .names import check_name
from .store import is_digest

FORMAT_VERSION = 1


@dataclass(frozen=True)
class BlobRef:
    """A reference to one blob: its content address, the codec that reads it, its size in bytes."""

    digest: str
    codec: str
    size: int


@dataclass(frozen=True)
class BackboneVersion:
    """One version of the shared weights: a full copy (`base` None) or a sparse delta of `base`."""

    blob: BlobRef
    base: str | None = None


def label_problem(labels: Sequence[object], classes: int) -> str | None:
    """Why `labels` cannot name `classes` classes (none, or one per class, each text on one line:
    Triton's label file has a line per class), or None."""
    if labels and len(labels) != classes:
        return f"{classes} classes but {len(labels)} labels: {list(labels)[:20]}"
    for label in labels:
        if not isinstance(label, str):
            return f"class label {label!r} is a {type(label).__name__}, not text"
        if "\n" in label or "\r" in label:
            return f"class label {label!r} has a line break (a label file has one line per class)"
        try:
            label.encode("utf-8")
        except UnicodeEncodeError:  # a file name's bytes that are not UTF-8, as Python decodes them
            return f"class label {label!r} is not UTF-8 text"
    return None


@dataclass(frozen=True)
class TaskEntry:
    """One published task: immutable once a generation containing it exists.

    `parts` maps a part name ('masks', 'bn_stats', 'head', ...) to its blob; `backbone` names the
    backbone version the parts apply to; `metrics` are figures recorded when the task was trained;
    `labels` names each class (output `i` is class `labels[i]`), where the task stream knows them.
    """

    id: int
    name: str
    method: str
    backbone: str
    num_classes: int
    parts: Mapping[str, BlobRef]
    metrics: Mapping[str, Any] = field(default_factory=dict)
    shares: tuple[int, ...] = ()  # earlier tasks whose frozen subnetworks this task reuses (weight sharing)
    state: Mapping[str, BlobRef] = field(default_factory=dict)  # training-only (scores, importance): never served
    labels: tuple[str, ...] = ()  # one per class, or none (a stream that does not name its classes)

    def __post_init__(self):
        check_name("task", self.name)
        object.__setattr__(self, "shares", tuple(self.shares))
        object.__setattr__(self, "labels", tuple(self.labels))
        if problem := label_problem(self.labels, self.num_classes):
            raise ManifestError(f"task {self.id} ({self.name}): {problem}")
        if any(not 0 <= s < self.id for s in self.shares):
            raise ManifestError(f"task {self.id} ({self.name}) can only share earlier tasks, not {list(self.shares)}")


@dataclass(frozen=True)
class Manifest:
    """Everything needed to rebuild and serve one generation of a model from the registry alone."""

    model: str
    generation: int
    architecture: Mapping[str, Any]
    input_shape: tuple[int, ...]
    backbones: Mapping[str, BackboneVersion]
    tasks: tuple[TaskEntry, ...]
    training: Mapping[str, Any] = field(default_factory=dict)
    shared: Mapping[str, BlobRef] = field(default_factory=dict)  # parts many tasks use (basis masks)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        check_name("model", self.model)
        for version in self.backbones:
            self._check_delta_chain(version)
        for task in self.tasks:
            if task.backbone not in self.backbones:
                raise ManifestError(
                    f"model '{self.model}': task {task.id} ({task.name}) needs backbone version {task.backbone!r}, "
                    f"which the manifest does not have (versions: {', '.join(self.backbones) or 'none'})"
                )
            if (lacks := missing_parts(task.method, task.parts, self.shared)) is not None:
                raise ManifestError(f"model '{self.model}': task {task.id} ({task.name}): {lacks}")
        ids = [t.id for t in self.tasks]
        names = [t.name for t in self.tasks]
        if len(set(ids)) != len(ids) or len(set(names)) != len(names):
            raise ManifestError(f"model '{self.model}': task ids and names must be unique (ids {ids}, names {names})")

    def _check_delta_chain(self, version: str) -> None:
        seen = [version]
        while (base := self.backbones[seen[-1]].base) is not None:
            if base not in self.backbones or base in seen:
                raise ManifestError(f"model '{self.model}': backbone {version} has a broken delta chain {seen + [base]}")
            seen.append(base)

    def backbone(self, version: str) -> BackboneVersion:
        if version not in self.backbones:
            raise ManifestError(f"model '{self.model}' has no backbone version {version!r} (versions: {', '.join(self.backbones)})")
        return self.backbones[version]

    def blob_refs(self) -> list[BlobRef]:
        """Every blob this generation references."""
        return [ref for ref, _ in self.blob_uses()]

    def blob_uses(self) -> list[tuple[BlobRef, str]]:
        """Every blob this generation references, with what it is to the model, in words
        ("backbone version 1", "task 2 (perm-2) part masks"), for messages about a bad blob."""
        return ([(b.blob, f"backbone version {v}") for v, b in self.backbones.items()]
                + [(ref, f"shared part {kind}") for kind, ref in self.shared.items()]
                + [(ref, f"task {t.id} ({t.name}) {what} {kind}") for t in self.tasks
                   for what, refs in (("part", t.parts), ("training state", t.state)) for kind, ref in refs.items()])

    @cached_property  # servers look a task up on every request: a scan of 1,000 tasks cost ~0.1 ms
    def _tasks_by_id(self) -> dict[int, TaskEntry]:
        return {t.id: t for t in self.tasks}

    @cached_property
    def _tasks_by_name(self) -> dict[str, TaskEntry]:
        return {t.name: t for t in self.tasks}

    def task(self, key: int | str) -> TaskEntry:
        """The task with id `key` (int) or name `key` (str); TaskNotFound lists what exists."""
        task = (self._tasks_by_id if isinstance(key, int) else self._tasks_by_name).get(key)
        if task is not None:
            return task
        raise TaskNotFound(f"model '{self.model}' has no task {key!r} at generation {self.generation} "
                           f"(tasks: {self.task_list})")

    @property
    def task_list(self) -> str:
        """The tasks as a person reads them in a message: "0 (perm-0), 1 (perm-1)", or "none yet"."""
        return ", ".join(f"{t.id} ({t.name})" for t in self.tasks) or "none yet"

    def next(self, *, tasks: tuple[TaskEntry, ...] | None = None, **changes) -> "Manifest":
        """The following generation with `changes` applied; published tasks can only be appended to."""
        tasks = self.tasks if tasks is None else tasks
        if tasks[: len(self.tasks)] != self.tasks:
            raise ManifestError(f"model '{self.model}': published tasks are immutable and can only be appended to")
        return dataclasses.replace(self, generation=self.generation + 1, tasks=tasks, **changes)

    def to_json(self) -> bytes:
        body = _canonical(dataclasses.asdict(self))
        return json.dumps({"sha256": hashlib.sha256(body).hexdigest(), "manifest": json.loads(body)}, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, source: str) -> "Manifest":
        """Parse and verify a manifest; every problem is a ManifestError naming `source`."""
        try:
            doc = json.loads(data)
            body = doc["manifest"]
            checksum = doc["sha256"]
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: nested beyond reason
            raise ManifestError(f"manifest {source} is unreadable ({type(exc).__name__}: {exc}); it may be truncated") from None
        if hashlib.sha256(_canonical(body)).hexdigest() != checksum:
            raise ManifestError(f"manifest {source} fails its checksum: it was edited or damaged after publishing")
        if not isinstance(body, dict):
            raise ManifestError(f"manifest {source} is malformed: its body is a JSON {type(body).__name__}, not an object")
        version = body.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"manifest {source} has format version {version!r}; this maskbank reads version "
                f"{FORMAT_VERSION}: upgrade maskbank to read it"
            )
        try:
            return _manifest_from_dict(body)
        except (KeyError, TypeError, ValueError, AttributeError, RegistryError) as exc:  # AttributeError: a list for a dict
            why = str(exc) if isinstance(exc, RegistryError) else f"{type(exc).__name__}: {exc}"
            raise ManifestError(f"manifest {source} is malformed: {why}") from None


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_plain).encode()


def _plain(value: Any) -> Any:
    if isinstance(value, MappingProxyType):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _manifest_from_dict(body: dict) -> Manifest:
    """The manifest of a checksummed JSON body, its fields' types checked (TypeError naming the first
    wrong one): a checksum says nothing about a writer that put a string where a count goes, and such a
    value failed later, as a traceback, in whatever command read it."""
    tasks = tuple(_task(t) for t in _of(body["tasks"], list, "tasks"))
    backbones = {_version(k): BackboneVersion(_blob(_of(v, dict, f"backbone {k}")["blob"]),
                                                                  _of(v.get("base"), (str, type(None)), f"backbone {k} base"))
                 for k, v in _of(body["backbones"], dict, "backbones").items()}
    return Manifest(
        model=_of(body["model"], str, "model"),
        generation=_of(body["generation"], int, "generation"),
        architecture=_of(body["architecture"], dict, "architecture"),
        input_shape=tuple(_of(d, int, "input_shape") for d in _of(body["input_shape"], list, "input_shape")),
        backbones=backbones,
        tasks=tasks,
        training=_of(body.get("training", {}), dict, "training"),
        shared=_blobs(body.get("shared", {}), "shared"),
        format_version=body["format_version"],
    )


def _version(key: Any) -> str:
    """A backbone version: its number as text (versions are ordered as numbers)."""
    if not (isinstance(key, str) and key.isascii() and key.isdigit()):
        raise ValueError(f"backbone version {str(key)[:80]!r} is not a number")
    return key


def _task(t: Any) -> TaskEntry:
    t = _of(t, dict, "a task")
    where = f"task {t.get('id')!r}"
    return TaskEntry(
        id=_of(t["id"], int, f"{where} id"), name=_of(t["name"], str, f"{where} name"),
        method=_of(t["method"], str, f"{where} method"), backbone=_of(t["backbone"], str, f"{where} backbone"),
        num_classes=_positive(_of(t["num_classes"], int, f"{where} num_classes"), f"{where} num_classes"),
        parts=_blobs(t["parts"], f"{where} parts"),
        metrics=_of(t.get("metrics", {}), dict, f"{where} metrics"),
        shares=tuple(_of(s, int, f"{where} shares") for s in _of(t.get("shares", []), list, f"{where} shares")),
        state=_blobs(t.get("state", {}), f"{where} state"),
        labels=tuple(_of(label, str, f"{where} labels") for label in _of(t.get("labels", []), list, f"{where} labels")))


def _blobs(value: Any, where: str) -> dict[str, BlobRef]:
    return {_of(name, str, where): _blob(ref, f"{where} {name}") for name, ref in _of(value, dict, where).items()}


def _blob(value: Any, where: str = "a blob reference") -> BlobRef:
    value = _of(value, dict, where)
    digest = _of(value["digest"], str, f"{where} digest")
    if not is_digest(digest):  # read as a path later: one bad reference stopped verify for every model
        raise ValueError(f"{where} digest {digest[:80]!r} is not 'sha256:' and 64 hex digits")
    return BlobRef(digest=digest, codec=_of(value["codec"], str, f"{where} codec"), size=_of(value["size"], int, f"{where} size"))


def _positive(value: int, where: str) -> int:
    if value < 1:
        raise ValueError(f"{where} is {value}, not a positive count")
    return value


def _of(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    """`value`, if it is a `kind` (a bool is no int here), else TypeError naming `where`."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise TypeError(f"{where} is {json.dumps(value)[:80]}, of the wrong type")
    return value
