"""Materialisation: (backbone, task artifact) -> the effective parameters of that task.

Trainer evaluation and serving both go through here, so a task is computed the same way
everywhere; the forward pass is `torch.func.functional_call` over the plain architecture module.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Mapping, Sequence

import torch
from torch import nn

from .architectures import maskable_parameters
from .errors import InvalidArtifact, unknown
from .packed import PackedMasks

Tensors = Mapping[str, torch.Tensor]
Materializer = Callable[[Tensors, Mapping[str, Tensors], Mapping[str, Tensors]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Materialization:
    """How a method's tasks are served.

    build: (backbone, task parts, the model's shared parts) -> effective parameters and buffers.
    backbone: which backbone version a task runs on. "own": the version it was published with
        (methods whose published tasks never change). "latest": the model's newest version, so
        earlier tasks see what later tasks taught the shared network (SPG, fine-tuning, EWC:
        their forgetting or transfer is part of the method and is measured as BWT).
    head_only: a task differs from the backbone only in its output layer (the `head` part), so
        tasks on one backbone version can share a single pass up to that layer (GN exhaustive).
    into_buffers: build takes an `out` keyword (see `effective_parameters`) and writes each
        effective weight into the caller's buffer of that name, so a server can compute a task's
        weights per request without allocating them.
    on_any_device: build runs on the device of the backbone it is given (and of `out`), whatever
        device the task's parts are on, so a GPU server builds a task's weights on the GPU.
    parts: the parts every task of the method has; shared: the model's shared parts it needs.
    """

    build: Materializer
    backbone: Literal["own", "latest"] = "own"
    head_only: bool = False
    into_buffers: bool = False
    on_any_device: bool = False
    parts: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()


_MATERIALIZERS: dict[str, Materialization] = {}


def register_materializer(*methods: str, parts: tuple[str, ...] = (), shared: tuple[str, ...] = (),
                          backbone: Literal["own", "latest"] = "own", head_only: bool = False,
                          into_buffers: bool = False, on_any_device: bool = False):
    """Decorator: how tasks of `methods`, which have `parts` (and whose model has `shared`), turn
    (backbone, task parts, the model's shared parts) into the effective parameters (and buffers)
    of a forward pass; see `Materialization`. `parts` left out (a plugin written before it existed)
    checks nothing: the materialiser then meets a missing part itself."""
    if backbone not in ("own", "latest"):
        raise ValueError(f"backbone must be 'own' or 'latest', got {backbone!r}")

    def decorate(fn: Materializer) -> Materializer:
        for method in methods:
            _MATERIALIZERS[method] = Materialization(fn, backbone, head_only, into_buffers, on_any_device, parts, shared)
        return fn

    return decorate


def materialization(method: str) -> Materialization:
    """The registered materialisation of `method` (UnknownName naming the known ones otherwise)."""
    if method not in _MATERIALIZERS:
        raise unknown("method", method, _MATERIALIZERS)
    return _MATERIALIZERS[method]


def missing_parts(method: str, parts: Iterable[str], shared: Iterable[str]) -> str | None:
    """What a task of `method` with `parts`, in a model with `shared` parts, lacks, in words (None:
    nothing, or a method this maskbank does not know, whose needs it cannot judge)."""
    needs = _MATERIALIZERS.get(method)
    if needs is None:
        return None
    lacks = [f"part '{p}'" for p in needs.parts if p not in parts] + [
        f"the model's shared part '{p}'" for p in needs.shared if p not in shared]
    return f"method {method} needs {' and '.join(lacks)}; the task has parts {sorted(parts)}" if lacks else None


def served_backbone(method: str, own: str, versions: Iterable[str]) -> str:
    """The backbone version a task of `method`, published with version `own`, runs on in a model
    whose versions are `versions` (numbered "1", "2", ...)."""
    return max(versions, key=int) if materialization(method).backbone == "latest" else own


def effective_parameters(
    method: str, backbone: Tensors, parts: Mapping[str, Tensors], shared: Mapping[str, Tensors] | None = None,
    out: Tensors | None = None,
) -> dict[str, torch.Tensor]:
    """The parameters a task's forward pass uses, checked against the backbone.

    out: optional buffers by weight name (the backbone weight's shape and dtype). A method whose
        materialisation has `into_buffers` writes the effective weights into them, bit for bit
        the values it would allocate; the result then holds `out`'s tensors, valid until the
        caller reuses them. Other methods ignore `out`.
    """
    found = materialization(method)
    if (lacks := missing_parts(method, parts, shared or {})) is not None:
        raise InvalidArtifact(lacks)
    if out is not None and found.into_buffers:
        return found.build(backbone, parts, shared or {}, out=out)
    return found.build(backbone, parts, shared or {})


def check_compatible(what: str, shapes: Mapping[str, Sequence[int]], backbone: Tensors) -> None:
    """Raise InvalidArtifact unless `shapes` (of a task's tensors, by name) has exactly the backbone's
    keys and shapes."""
    if set(shapes) != set(backbone):
        raise InvalidArtifact(
            f"{what} has keys {sorted(shapes)} but the backbone has {sorted(backbone)}"
        )
    for name, shape in shapes.items():
        if tuple(shape) != tuple(backbone[name].shape):
            raise InvalidArtifact(
                f"{what} '{name}' has shape {list(shape)}, the backbone {list(backbone[name].shape)}"
            )


def check_head(method: str, head: Tensors, backbone: Tensors) -> None:
    """Raise InvalidArtifact unless every tensor of a task's `head` replaces a backbone weight of its shape."""
    for name, tensor in head.items():
        if name not in backbone:
            raise InvalidArtifact(f"{method} head '{name}' is not a backbone weight (weights: {sorted(backbone)})")
        if tensor.shape != backbone[name].shape:
            raise InvalidArtifact(f"{method} head '{name}' has shape {list(tensor.shape)}, "
                                  f"the backbone {list(backbone[name].shape)}")


@register_materializer("supsup", parts=("masks",), into_buffers=True, on_any_device=True)
def _supsup(backbone: Tensors, parts: Mapping[str, Tensors], shared: Mapping[str, Tensors],
            out: Tensors | None = None) -> dict[str, torch.Tensor]:
    masks = PackedMasks.pack(parts["masks"])
    check_compatible("supermask", masks.shapes, backbone)
    device = next(iter(backbone.values())).device  # where the weights are built: BatchNorm statistics go there too
    if device.type == "cpu" and not masks.is_one_buffer:
        # mask-as-float times weight, in place on the fresh copy (or `out`'s buffer): the same products
        # bit for bit as `weight * mask`, but several times faster on CPU than PyTorch's mixed
        # bool x float kernel (what a server pays per cache miss; python -m bench.serving --only task_mix).
        effective = {name: masks.as_float(name, weight.dtype, None if out is None else out[name]).mul_(weight)
                     for name, weight in backbone.items()}
    else:  # a GPU (or masks moved as a GPU's are): all masks unpacked in one pass, then one uint8 x float product each
        bits = masks.to(device).bits()
        effective = {name: torch.mul(bits[name], weight, out=None if out is None else out[name])
                     for name, weight in backbone.items()}
    return {**effective, **{name: t.to(device) for name, t in parts.get("bn_stats", {}).items()}}


def forward(module: nn.Module, params: Tensors, x: torch.Tensor) -> torch.Tensor:
    """Run `module` (in eval mode) with `params` in place of its own parameters and buffers.

    Every parameter and BatchNorm running statistic must be given (strict): a task that lacks
    its statistics is an error, not a silent mean 0 / variance 1. Only BatchNorm's batch
    counters, which eval mode never reads, are filled from the module.
    """
    if module.training:  # in training mode BatchNorm would use batch statistics and overwrite the task's
        module.eval()
    counters = {n: b for n, b in _batch_counters(module).items() if n not in params}
    return torch.func.functional_call(module, {**params, **counters}, (x,), strict=True)


def head_name(module: nn.Module) -> str:
    """The name of the output layer's weight (the network's last matrix or kernel): a per-task
    `head` part replaces it."""
    return maskable_parameters(module)[-1]


def head_input(module: nn.Module, params: Tensors, x: torch.Tensor) -> torch.Tensor:
    """What the output layer receives when `module` runs with `params` on `x`: the shared part of
    the computation of every task that differs from `params` only in its head."""
    captured: list[torch.Tensor] = []
    layer = module.get_submodule(head_name(module).rsplit(".", 1)[0])
    handle = layer.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        forward(module, params, x)
    finally:
        handle.remove()
    return captured[0]


_COUNTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _batch_counters(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's BatchNorm batch counters, found once per module (forward is on the hot path)."""
    counters = _COUNTERS.get(module)
    if counters is None:
        counters = _COUNTERS[module] = {n: b for n, b in module.named_buffers() if n.endswith("num_batches_tracked")}
    return counters


def _discover_materializers() -> None:
    """Import every `registry/materialize_<method>.py`: a method's materialiser lives there and
    registers itself, so servers know every method the registry can hold without a list to keep."""
    import importlib
    import pkgutil

    package = __name__.rsplit(".", 1)[0]
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if module.name.startswith("materialize_"):
            importlib.import_module(f"{package}.{module.name}")


_discover_materializers()
