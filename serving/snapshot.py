"""A snapshot: the immutable, loaded view of one manifest generation of one model.

Requests hold the snapshot they started on; a reload builds the next one and swaps a pointer.
Tasks are immutable once published, so a new snapshot reuses the decoded tasks and backbone of
the previous one (matched by blob digest) and only loads what is new. A task whose blobs fail
verification is kept out of service with its error; the other tasks keep serving.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Mapping

import torch
import torch.nn.functional as F

from registry import (
    BlobCorrupt,
    BlobNotFound,
    BlobRef,
    BlobUndecodable,
    BlobUnreadable,
    InvalidArtifact,
    Manifest,
    MaskbankError,
    PackedMasks,
    Registry,
    RegistryUnreachable,
    TaskEntry,
    build_architecture,
    effective_parameters,
    head_name,
    materialization,
    served_backbone,
)

from .bound import BoundModule
from .cache import CacheView, LRUCache
from .entropy import autograd_gradients, chain_forward, chain_gradients, linear_chain
from .superposition import MaskStack

log = logging.getLogger("maskbank.serving")
Tensors = dict[str, torch.Tensor]
_UNBUILT = object()  # a lazily built attribute not built yet (None is a result)


@dataclass(frozen=True)
class LoadedTask:
    """A task's decoded parts, or the error that keeps it out of service."""

    entry: TaskEntry
    parts: Mapping[str, Tensors] | None
    error: MaskbankError | None = None

    @cached_property  # on the request path: computed once per task
    def key(self) -> tuple:
        return (self.entry.backbone, *sorted((n, r.digest) for n, r in self.entry.parts.items()))


class Snapshot:
    """One generation of a model, ready to run; safe to share between threads."""

    def __init__(self, manifest: Manifest, backbones: dict[str, Tensors], shared: dict[str, Tensors],
                 tasks: dict[int, LoadedTask], cache: LRUCache, device: torch.device | str = "cpu",
                 previous: "Snapshot | None" = None):
        """`device`: where forwards run and cached effective weights live. The registry's tensors stay
        on the CPU; on another device the snapshot also keeps there a copy of each backbone and, for
        methods that build their weights on any device (SupSup, ExSSNeT), of each task's parts (1 bit
        per weight for masks), reusing `previous`'s copies of what did not change."""
        self.manifest = manifest
        self.device = torch.device(device)
        reusable = previous if previous is not None and previous.device == self.device else None
        self._resident = {v: reusable._resident[v] if reusable and reusable.backbones.get(v) is b else _to_device(b, self.device)
                          for v, b in backbones.items()}
        # each CPU backbone tensor's copy on the device: effective weights that are the backbone's own
        # tensors (unmasked biases, shared layers) use the copy instead of being copied per task
        self._copies = {id(t): self._resident[v][n] for v, b in backbones.items() for n, t in b.items()}
        self._uploaded_parts = self._upload_tasks(tasks, reusable)
        self._template = build_architecture(manifest.architecture).eval()
        self._head_layer = head_name(self._template).rsplit(".", 1)[0]  # the module holding the output weight
        self._chain = linear_chain(self._template)  # a plain MLP's weight names: gradients in closed form
        self._chain_names = frozenset(self._chain or ())
        self._per_thread = threading.local()
        self.backbones = backbones
        self.shared = shared
        self.tasks = tasks
        self._healthy = [t for t in tasks.values() if t.error is None]  # tasks are frozen: decided once
        self._cache = cache.view()  # closed when the snapshot retires (stop_caching)
        self._mask_stack: MaskStack | None | object = _UNBUILT  # None: nothing to superpose
        self._alpha_stack: tuple[list[int], dict[str, torch.Tensor]] | None = None
        self._lock = threading.Lock()

    @property
    def bound(self) -> BoundModule:
        """This thread's own copy of the architecture (a forward fills the copy's slots with one
        task's tensors, so threads must never share one)."""
        bound = getattr(self._per_thread, "bound", None)
        if bound is None:
            bound = self._per_thread.bound = BoundModule(self._template)
        return bound

    def forward(self, params: Tensors, x: torch.Tensor) -> torch.Tensor:
        """The architecture's output for `x` under `params` (on the snapshot's device), on this
        thread's copy of the module; `x` may be on the CPU."""
        return self.bound(params, x.to(self.device))

    def on_device(self, params: Tensors) -> Tensors:
        """`params` on the snapshot's device: the backbone's own tensors as the snapshot's copy there,
        others copied. On the CPU, `params` itself."""
        if self.device.type == "cpu":
            return params
        return {name: self._copies[id(t)] if id(t) in self._copies else t.to(self.device)
                for name, t in params.items()}

    def entropy_gradients(self, params: Tensors, x: torch.Tensor, classes: int, names: list[str]) -> Tensors:
        """dH/dW of the tensors `names` at `params`, H the mean entropy of the first `classes` logits
        of `x` (serving/entropy.py): in closed form on a plain MLP, else by autograd. Computed on the
        snapshot's device; `params` and `x` may be on the CPU."""
        params, x = self.on_device(params), x.to(self.device)
        if self._chain is None:
            return autograd_gradients(self.forward, params, x, classes, names)
        wanted = [self._chain.index(n) for n in names]
        gradients = chain_gradients([params[n] for n in self._chain], x, classes, wanted)
        return {n: gradients[i] for n, i in zip(names, wanted)}

    def _head(self) -> BoundModule:
        """This thread's own copy of the output layer alone, to run one head on shared features."""
        head = getattr(self._per_thread, "head", None)
        if head is None:
            head = self._per_thread.head = BoundModule(self._template.get_submodule(self._head_layer))
        return head

    def _head_input(self, params: Tensors, x: torch.Tensor) -> torch.Tensor:
        """What the output layer receives when the module runs with `params` on `x` (not
        registry.head_input: that finds the layer by its parameters, which a BoundModule's copy
        holds only during a call)."""
        captured: list[torch.Tensor] = []
        layer = self.bound.module.get_submodule(self._head_layer)
        handle = layer.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
        try:
            self.forward(params, x)
        finally:
            handle.remove()
        return captured[0]

    @property
    def model(self) -> str:
        return self.manifest.model

    @cached_property
    def weights(self) -> int:
        """Elements of the largest backbone: a forward's multiply-adds per input row, roughly."""
        return max((sum(t.numel() for t in b.values()) for b in self.backbones.values()), default=0)

    @property
    def generation(self) -> int:
        return self.manifest.generation

    @classmethod
    def load(cls, registry: Registry, manifest: Manifest, previous: "Snapshot | None", cache: LRUCache,
             gradients: bool = False, device: torch.device | str = "cpu") -> "Snapshot":
        """Load `manifest` to serve on `device`, reusing what `previous` already decoded (and uploaded).
        A broken backbone raises. The mask stack of the gradient modes is built now (from `previous`'s
        where it has one) when `gradients` asks or `previous` built one (those modes are in use), else
        on first use."""
        backbones = {}
        for version, entry in manifest.backbones.items():  # versions are immutable once published
            unchanged = previous is not None and previous.manifest.backbones.get(version) == entry
            backbones[version] = previous.backbones[version] if unchanged else registry.load_backbone(manifest, version)
        shared = {}
        for kind, ref in manifest.shared.items():
            unchanged = previous is not None and previous.manifest.shared.get(kind) == ref
            shared[kind] = previous.shared[kind] if unchanged else registry.load(ref)
        # a task that failed to load is loaded again: its blob may have been restored since
        reusable = {t.key: t for t in previous.tasks.values() if t.error is None} if previous else {}
        tasks = {}
        for entry in manifest.tasks:
            # the decoded parts are reused, with this manifest's entry: the same blobs may be another task's
            # (two tasks with equal masks) or a task renamed or relabelled by a model published again
            reused = reusable.get(LoadedTask(entry, None).key)
            tasks[entry.id] = (LoadedTask(entry, reused.parts) if reused is not None
                               else _load_task(registry, manifest.model, entry))
            failed_before = previous is not None and entry.id in previous.tasks and previous.tasks[entry.id].error
            if failed_before and tasks[entry.id].error is None:
                log.info("model '%s': task %s (%s) is back in service", manifest.model, entry.id, entry.name)
        snapshot = cls(manifest, backbones, shared, tasks, cache, device, previous)
        earlier = previous._mask_stack if previous is not None and isinstance(previous._mask_stack, MaskStack) else None
        if gradients or earlier is not None:  # ready before the swap
            snapshot._mask_stack = snapshot._build_mask_stack(earlier)
        return snapshot

    @property
    def cache(self) -> CacheView:
        """The shared cache as this snapshot puts into it (refused once it stopped caching)."""
        return self._cache

    def uses(self, key: tuple) -> bool:
        """Whether this snapshot may look `key`, a key of its model, up in the shared cache: after a swap,
        what is not (the weights of a backbone version replaced, as every SPG, finetune or EWC task makes;
        an earlier basis; an earlier mask stack) is evicted rather than left to age out."""
        if key[1] == "mask-stack":
            return isinstance(self._mask_stack, MaskStack) and key == self._mask_stack.key
        if key[1] == "basis":
            basis = self.manifest.shared.get("basis_masks")
            return basis is not None and key[2] == basis.digest and key[4] in self.backbones
        return (key[1], key[2]) in self._weight_keys  # (model, version, task key[, backend name])

    @cached_property
    def _weight_keys(self) -> frozenset[tuple]:
        """(backbone version, task key) of every task in service: what its cached weights are keyed by."""
        return frozenset((self.backbone_version(t), t.key) for t in self._healthy)

    def stop_caching(self) -> None:
        """Put nothing more into the shared cache: requests still running on this snapshot build what
        they miss without keeping it, so entries evicted for it stay evicted."""
        self._cache.close()

    def retire(self) -> None:
        """This snapshot is no longer served (replaced or unloaded): it stops caching, and drops what
        it keeps in the shared cache for gradient modes. Requests still running on it keep working."""
        self.stop_caching()
        if isinstance(self._mask_stack, MaskStack):
            self._mask_stack.retire()

    def warm(self) -> None:
        """Build the superposition matrix of a stack prepared at load (if the cache admits it) in the
        caller's thread, so the first gradient request after a reload does not build it."""
        if isinstance(self._mask_stack, MaskStack):
            self._mask_stack.dense()

    def task(self, key: int | str) -> LoadedTask:
        """The task with id or name `key`: TaskNotFound if absent, its load error if broken."""
        loaded = self.tasks[self.manifest.task(key).id]
        if loaded.error is not None:
            raise loaded.error
        return loaded

    def out_of_service(self) -> list[LoadedTask]:
        """The tasks that failed to load (a missing or corrupt blob), in id order."""
        return [t for t in self.tasks.values() if t.error is not None]

    def any_task_back(self, registry: Registry) -> bool:
        """Whether a task out of service would load now (its blobs restored or arrived since): a quiet
        check that keeps nothing, for polls that retry them."""
        for task in self.out_of_service():
            try:
                for ref in task.entry.parts.values():
                    registry.load(ref)
            except RegistryUnreachable:
                raise
            except MaskbankError:
                continue
            return True
        return False

    @property
    def out_of_service_count(self) -> int:
        """How many tasks are out of service (task inference chooses among the others)."""
        return len(self.tasks) - len(self._healthy)

    def healthy_tasks(self) -> list[LoadedTask]:
        """The tasks in service (loaded without error), in id order: a new list (on the GN path, per request)."""
        return list(self._healthy)

    def backbone_version(self, task: LoadedTask) -> str:
        """The backbone version `task` runs on in this generation (its own, or the newest for
        methods whose earlier tasks follow the shared network: registry.served_backbone)."""
        return served_backbone(task.entry.method, task.entry.backbone, self.backbones)

    def effective_parameters(self, task: LoadedTask) -> Tensors:
        """The task's effective parameters on the backbone it is served with, on the CPU, computed
        now (`parameters` caches them on the snapshot's device)."""
        return effective_parameters(task.entry.method, self.backbones[self.backbone_version(task)], task.parts, self.shared)

    def _builds_on_device(self, task: LoadedTask) -> bool:
        """Whether `task`'s weights are built on the snapshot's device (its method's materialisation
        runs `on_any_device`) rather than on the CPU and copied. An unknown method's task is not: it
        fails on use with its own error, like on the CPU."""
        try:
            return task.error is None and materialization(task.entry.method).on_any_device
        except MaskbankError:
            return False

    def _upload_tasks(self, tasks: dict[int, LoadedTask], reusable: "Snapshot | None") -> dict[tuple, dict[str, Tensors]]:
        """By task key, the parts on the snapshot's device of the tasks built there (none on the CPU),
        taken from `reusable` (a previous generation on this device) where it has them."""
        if self.device.type == "cpu":
            return {}
        earlier = reusable._uploaded_parts if reusable is not None else {}
        return {t.key: earlier.get(t.key) or self._upload(t.parts) for t in tasks.values() if self._builds_on_device(t)}

    def _upload(self, parts: Mapping[str, Tensors]) -> dict[str, Tensors]:
        """A task's parts on the snapshot's device (masks as one buffer of packed bytes: PackedMasks.to)."""
        return {kind: part.to(self.device) if isinstance(part, PackedMasks) else _to_device(part, self.device)
                for kind, part in parts.items()}

    def _sources(self, task: LoadedTask, version: str) -> tuple[Tensors, Mapping[str, Tensors]]:
        """The backbone and parts `task`'s weights are built from: the copies on the snapshot's device
        for a method whose materialisation runs `on_any_device` (on a GPU: no copy per miss), else
        the CPU's (the result is copied)."""
        if self.device.type != "cpu" and self._builds_on_device(task):
            return self._resident[version], self._uploaded_parts[task.key]
        return self.backbones[version], task.parts

    def _built_on_device(self, task: LoadedTask, version: str, out: Tensors | None = None) -> Tensors:
        """The task's effective parameters on the snapshot's device, computed now from `_sources` (into
        `out`, buffers beside those sources, for a method that builds into buffers)."""
        backbone, parts = self._sources(task, version)
        return self.on_device(effective_parameters(task.entry.method, backbone, parts, self.shared, out=out))

    def parameters(self, task: LoadedTask) -> Tensors:
        """The task's effective parameters on the snapshot's device, from the byte-bounded LRU cache."""
        version = self.backbone_version(task)

        def build():
            params = self._built_on_device(task, version)
            return params, _cached_bytes(params, self._resident[version])

        return self._cache.get_or_create((self.model, version, task.key), build)

    def _forward_parameters(self, task: LoadedTask) -> Tensors:
        """The task's effective parameters for one forward pass on this thread: `parameters`, except
        that a miss the cache does not admit (LRUCache.admits) of a method that builds into buffers
        is computed into this thread's scratch buffers, valid until this thread's next call.

        Why: with more tasks in use than fit, the hit rate is what it is whichever tasks are kept,
        and a miss written into warm, reused buffers costs less than one allocated, kept and later
        evicted (python -m bench.serving --only task_mix, random tasks of 1,000)."""
        if not materialization(task.entry.method).into_buffers:
            return self.parameters(task)
        version = self.backbone_version(task)
        key = (self.model, version, task.key)
        params = self._cache.get(key)
        if params is None:
            backbone = self._resident[version]
            if self._cache.admits(key, _nbytes(backbone)):  # its weights replace the backbone's, one for one
                params = self._built_on_device(task, version)
                self._cache.put(key, params, _cached_bytes(params, backbone))
            else:
                params = self._built_on_device(task, version, out=self._scratch(version, self._sources(task, version)[0]))
        return params

    def _scratch(self, version: str, backbone: Tensors) -> Tensors:
        """This thread's buffers for the effective weights of a task on backbone `version`, like
        `backbone` (the CPU's or the device's copy: where the task builds; working memory, like
        activations: not the cache's bytes; one set per serving thread, version and place)."""
        buffers = getattr(self._per_thread, "scratch", None)
        if buffers is None:
            buffers = self._per_thread.scratch = {}
        key = (version, backbone[next(iter(backbone))].device)
        if key not in buffers:
            buffers[key] = {name: torch.empty_like(weight) for name, weight in backbone.items()}
        return buffers[key]

    def logits(self, task: LoadedTask, x: torch.Tensor) -> torch.Tensor:
        """[N, classes of the task] logits of `x` under `task`. A plain MLP whose parameters are exactly
        its weights runs as `chain_forward` (the same operations as the module, without its call chain).
        Computed on the snapshot's device (`x` may be on the CPU), and left there."""
        with torch.no_grad():
            return self._logits(task, x.to(self.device))

    def _logits(self, task: LoadedTask, x: torch.Tensor) -> torch.Tensor:
        """`logits` for `x` already on the device, with autograd already off (the caller's loop over
        many tasks sets both up once: per task they cost 7% of exhaustive at 100 tasks of MLP
        64-128-128-10, batch 16)."""
        params = self._forward_parameters(task)
        if self._chain is not None and params.keys() == self._chain_names:
            return chain_forward([params[n] for n in self._chain], x)[:, : task.entry.num_classes]
        return self.forward(params, x)[:, : task.entry.num_classes]

    def logits_of(self, tasks: list[LoadedTask], x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each task's logits of `x`, by task id. Tasks that differ from their backbone only in the
        head (registry.materialization(...).head_only) and run on one backbone version share a
        single pass up to the output layer: T heads cost one forward plus T output layers."""
        x = x.to(self.device)  # once for all tasks
        logits, groups = {}, {}
        with torch.no_grad():
            for task in tasks:
                if materialization(task.entry.method).head_only:
                    groups.setdefault(self.backbone_version(task), []).append(task)
                else:
                    logits[task.entry.id] = self._logits(task, x)
            if groups:
                prefix, head = f"{self._head_layer}.", self._head()
                for group in groups.values():
                    features = self._head_input(self.parameters(group[0]), x)
                    for task in group:
                        own = {k[len(prefix) :]: v for k, v in self.parameters(task).items() if k.startswith(prefix)}
                        logits[task.entry.id] = head(own, features)[:, : task.entry.num_classes]
        return logits

    def mask_stack(self) -> MaskStack | None:
        """Every task's masks stacked over their backbone, for superposition (built on first use; its
        float matrix lives in the byte-bounded cache), or None unless all tasks in service have masks
        on one backbone version."""
        with self._lock:
            if self._mask_stack is _UNBUILT:
                self._mask_stack = self._build_mask_stack()
            return self._mask_stack

    def _build_mask_stack(self, previous: MaskStack | None = None) -> MaskStack | None:
        """The stack of mask_stack(); `previous`, a former generation's, saves summing its tasks again."""
        tasks = self.healthy_tasks()
        backbones = {t.entry.backbone for t in tasks}
        if not tasks or not all("masks" in t.parts for t in tasks) or len(backbones) != 1:
            return None
        if any("bn_stats" in t.parts for t in tasks):  # per-task BatchNorm statistics cannot be superposed
            return None
        # keyed by what the masks are (backbone version, blob digests), hashed once: a lookup per request
        key = (self.model, "mask-stack", hashlib.sha256(repr([t.key for t in tasks]).encode()).hexdigest())
        return MaskStack.build([t.entry.id for t in tasks], [t.entry.num_classes for t in tasks],
                               [t.parts["masks"] for t in tasks], self.backbones[backbones.pop()], self._cache, key,
                               previous, self.model)

    def alpha_stack(self) -> tuple[list[int], dict[str, torch.Tensor]]:
        """(task ids, per layer a float [T, B] stack of their alpha over the model's B basis masks),
        for basis task inference. A task published while the basis was smaller combines only the
        first masks (registry/materialize_impresslearn.py), so its alpha is zero-padded to B."""
        with self._lock:
            if self._alpha_stack is None:
                basis = self.shared.get("basis_masks", PackedMasks({}, {}))
                tasks = [t for t in self.healthy_tasks() if "alpha" in (t.parts or {})]
                stack = {name: torch.stack([F.pad(t.parts["alpha"][name].to(torch.float32),
                                                  (0, shape[0] - t.parts["alpha"][name].numel())) for t in tasks])
                         for name, shape in basis.shapes.items()} if tasks else {}
                self._alpha_stack = ([t.entry.id for t in tasks], stack)
            return self._alpha_stack

    def basis_parameters(self, method: str, backbone: str, index: int) -> Tensors:
        """The effective parameters of basis mask `index` alone (a one-hot alpha, materialised by
        `method` on `backbone`): the basis-GN candidates. From the byte-bounded LRU cache."""

        def build():
            alpha = {name: F.one_hot(torch.tensor(index), shape[0]).to(torch.float32)
                     for name, shape in self.shared["basis_masks"].shapes.items()}
            params = self.on_device(effective_parameters(method, self.backbones[backbone], {"alpha": alpha}, self.shared))
            return params, _nbytes(params)

        key = (self.model, "basis", self.manifest.shared["basis_masks"].digest, method, backbone, index)
        return self._cache.get_or_create(key, build)


def _to_device(tensors: Tensors, device: torch.device) -> Tensors:
    """`tensors` copied to `device` (on the CPU: `tensors` itself)."""
    return tensors if device.type == "cpu" else {name: t.to(device) for name, t in tensors.items()}


def _nbytes(params: Tensors) -> int:
    return sum(p.numel() * p.element_size() for p in params.values())


def _cached_bytes(params: Tensors, backbone: Tensors) -> int:
    """What caching `params` costs: its tensors that are not the backbone's own (the snapshot holds those anyway)."""
    resident = {id(t) for t in backbone.values()}
    return _nbytes({name: p for name, p in params.items() if id(p) not in resident})


def _load_task(registry: Registry, model: str, entry: TaskEntry) -> LoadedTask:
    """The task loaded, or out of service with its blob's error. A registry that does not answer says
    nothing about the blob: that fails the whole load (the previous generation keeps serving, the
    next poll retries) rather than take a sound task out of service."""
    parts = {}
    for part, ref in entry.parts.items():
        try:
            parts[part] = registry.load(ref)
        except RegistryUnreachable:
            raise
        except MaskbankError as error:
            log.error("model '%s': task %s (%s) is out of service: %s", model, entry.id, entry.name, error)
            return LoadedTask(entry, None, _said_to_clients(error, model, entry, part, ref))
    return LoadedTask(entry, parts)


def _said_to_clients(error: MaskbankError, model: str, entry: TaskEntry, part: str, ref: BlobRef) -> MaskbankError:
    """The error requests for a task out of service get (DATA_LOSS): which blob and how it failed, not
    where the server keeps it or how to restore it (the server's log has both). A blob error keeps its
    class; any other (a codec this server does not know) is said in its own words as InvalidArtifact."""
    failed = (f"cannot be decoded as {ref.codec}" if isinstance(error, BlobUndecodable) else
              "failed verification (its bytes hash to another digest)" if isinstance(error, BlobCorrupt) else
              "is missing" if isinstance(error, BlobNotFound) else
              "cannot be read" if isinstance(error, BlobUnreadable) else f"cannot be used: {error}")
    kind = type(error) if isinstance(error, (BlobCorrupt, BlobNotFound, BlobUnreadable)) else InvalidArtifact
    return kind(f"task {entry.id} ({entry.name}) of model '{model}' is out of service: its {part} blob {ref.digest} "
                f"{failed}; polls retry it, at growing intervals up to a minute")
