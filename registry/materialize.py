"""Materialisation: (backbone, task artifact) -> the effective parameters of that task.

Trainer evaluation and serving both go through here, so a task is computed the same way
everywhere; the forward pass is `torch.func.functional_call` over the plain architecture module.
"""

from __future__ import annotations

import weakref
from typing import Callable, Mapping

import torch
from torch import nn

from .errors import InvalidArtifact, unknown

Tensors = Mapping[str, torch.Tensor]
Materializer = Callable[[Tensors, Mapping[str, Tensors], Mapping[str, Tensors]], dict[str, torch.Tensor]]
_MATERIALIZERS: dict[str, Materializer] = {}


def register_materializer(*methods: str):
    """Decorator: how tasks of `methods` turn (backbone, task parts, the model's shared parts)
    into the effective parameters (and buffers) of a forward pass."""

    def decorate(fn: Materializer) -> Materializer:
        for method in methods:
            _MATERIALIZERS[method] = fn
        return fn

    return decorate


def effective_parameters(
    method: str, backbone: Tensors, parts: Mapping[str, Tensors], shared: Mapping[str, Tensors] | None = None
) -> dict[str, torch.Tensor]:
    """The parameters a task's forward pass uses, checked against the backbone."""
    if method not in _MATERIALIZERS:
        raise unknown("method", method, _MATERIALIZERS)
    return _MATERIALIZERS[method](backbone, parts, shared or {})


def check_compatible(what: str, tensors: Tensors, backbone: Tensors) -> None:
    """Raise InvalidArtifact unless `tensors` has exactly the backbone's keys and shapes."""
    if set(tensors) != set(backbone):
        raise InvalidArtifact(
            f"{what} has keys {sorted(tensors)} but the backbone has {sorted(backbone)}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != backbone[name].shape:
            raise InvalidArtifact(
                f"{what} '{name}' has shape {list(tensor.shape)}, the backbone {list(backbone[name].shape)}"
            )


@register_materializer("supsup")
def _supsup(backbone: Tensors, parts: Mapping[str, Tensors], shared: Mapping[str, Tensors]) -> dict[str, torch.Tensor]:
    masks = parts["masks"]
    check_compatible("supermask", masks, backbone)
    return {**{name: weight * masks[name] for name, weight in backbone.items()}, **parts.get("bn_stats", {})}


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
