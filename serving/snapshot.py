"""A snapshot: the immutable, loaded view of one manifest generation of one model.

Requests hold the snapshot they started on; a reload builds the next one and swaps a pointer.
Tasks are immutable once published, so a new snapshot reuses the decoded tasks and backbone of
the previous one (matched by blob digest) and only loads what is new. A task whose blobs fail
verification is kept out of service with its error; the other tasks keep serving.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from typing import Mapping

import torch

from registry import Manifest, MaskbankError, Registry, TaskEntry, build_architecture, effective_parameters, forward

from .cache import LRUCache

log = logging.getLogger("maskbank.serving")
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LoadedTask:
    """A task's decoded parts, or the error that keeps it out of service."""

    entry: TaskEntry
    parts: Mapping[str, Tensors] | None
    error: MaskbankError | None = None

    @property
    def key(self) -> tuple:
        return (self.entry.backbone, *sorted((n, r.digest) for n, r in self.entry.parts.items()))


class Snapshot:
    """One generation of a model, ready to run; safe to share between threads."""

    def __init__(self, manifest: Manifest, backbones: dict[str, Tensors], shared: dict[str, Tensors],
                 tasks: dict[int, LoadedTask], cache: LRUCache):
        self.manifest = manifest
        self._template = build_architecture(manifest.architecture).eval()
        self._per_thread = threading.local()
        self.backbones = backbones
        self.shared = shared
        self.tasks = tasks
        self._cache = cache
        self._mask_stack: tuple[list[int], dict[str, torch.Tensor]] | None = None
        self._lock = threading.Lock()

    @property
    def module(self) -> torch.nn.Module:
        """This thread's copy of the architecture. functional_call swaps a task's weights into
        the module for the length of a forward pass, so threads must never share one."""
        module = getattr(self._per_thread, "module", None)
        if module is None:
            module = self._per_thread.module = copy.deepcopy(self._template)
        return module

    @property
    def model(self) -> str:
        return self.manifest.model

    @property
    def generation(self) -> int:
        return self.manifest.generation

    @classmethod
    def load(cls, registry: Registry, manifest: Manifest, previous: "Snapshot | None", cache: LRUCache) -> "Snapshot":
        """Load `manifest`, reusing what `previous` already decoded. A broken backbone raises."""
        backbones = {}
        for version, entry in manifest.backbones.items():  # versions are immutable once published
            unchanged = previous is not None and previous.manifest.backbones.get(version) == entry
            backbones[version] = previous.backbones[version] if unchanged else registry.load_backbone(manifest, version)
        shared = {}
        for kind, ref in manifest.shared.items():
            unchanged = previous is not None and previous.manifest.shared.get(kind) == ref
            shared[kind] = previous.shared[kind] if unchanged else registry.load(ref)
        reusable = {t.key: t for t in previous.tasks.values()} if previous else {}
        tasks = {}
        for entry in manifest.tasks:
            candidate = LoadedTask(entry, None)
            tasks[entry.id] = reusable.get(candidate.key) or _load_task(registry, entry)
        return cls(manifest, backbones, shared, tasks, cache)

    def task(self, key: int | str) -> LoadedTask:
        """The task with id or name `key`: TaskNotFound if absent, its load error if broken."""
        loaded = self.tasks[self.manifest.task(key).id]
        if loaded.error is not None:
            raise loaded.error
        return loaded

    def healthy_tasks(self) -> list[LoadedTask]:
        return [t for t in self.tasks.values() if t.error is None]

    def parameters(self, task: LoadedTask) -> Tensors:
        """The task's effective parameters, from the byte-bounded LRU cache."""

        def build():
            params = effective_parameters(task.entry.method, self.backbones[task.entry.backbone], task.parts, self.shared)
            return params, sum(p.numel() * p.element_size() for p in params.values())

        return self._cache.get_or_create((self.model, task.key), build)

    def logits(self, task: LoadedTask, x: torch.Tensor) -> torch.Tensor:
        """[N, classes of the task] logits of `x` under `task`."""
        with torch.no_grad():
            return forward(self.module, self.parameters(task), x)[:, : task.entry.num_classes]

    def mask_stack(self) -> tuple[list[int], dict[str, torch.Tensor]]:
        """(task ids, per layer a float [T, *weight shape] stack of their masks), for superposition."""
        with self._lock:
            if self._mask_stack is None:
                tasks = [t for t in self.healthy_tasks() if "masks" in (t.parts or {})]
                names = list(tasks[0].parts["masks"]) if tasks else []
                stack = {n: torch.stack([t.parts["masks"][n].to(torch.float32) for t in tasks]) for n in names}
                self._mask_stack = ([t.entry.id for t in tasks], stack)
            return self._mask_stack


def _load_task(registry: Registry, entry: TaskEntry) -> LoadedTask:
    try:
        return LoadedTask(entry, {name: registry.load(ref) for name, ref in entry.parts.items()})
    except MaskbankError as error:
        log.error("task %s (%s) is out of service: %s", entry.id, entry.name, error)
        return LoadedTask(entry, None, error)
