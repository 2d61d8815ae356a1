"""Architecture specs: small JSON-able dicts from which a plain torch.nn.Module is built.

The modules know nothing of continual-learning methods: masks and per-task weights are applied
from outside (parametrize while training, functional_call while serving).

    build_architecture({"arch": "mlp", "sizes": [64, 300, 100, 10]})
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Callable, Mapping

from torch import nn

from .errors import InvalidArtifact, unknown

_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register_architecture(name: str):
    """Decorator: make a module builder available as `{"arch": name, ...its keyword arguments}`."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _ARCHITECTURES[name] = builder
        return builder

    return decorate


def build_architecture(spec: Mapping[str, Any]) -> nn.Module:
    """Build the module a spec describes; unknown architectures or keys raise with the known ones."""
    spec = dict(spec)
    name = spec.pop("arch", None)
    if name not in _ARCHITECTURES:
        raise unknown("architecture", str(name), _ARCHITECTURES)
    builder = _ARCHITECTURES[name]
    accepted = set(inspect.signature(builder).parameters)
    if extra := set(spec) - accepted:
        raise InvalidArtifact(f"architecture '{name}' takes {sorted(accepted)}, not {sorted(extra)}")
    return builder(**spec)


def maskable_parameters(module: nn.Module) -> list[str]:
    """Names of the weights that masks and signed-constant init apply to (matrices and kernels)."""
    return [name for name, p in module.named_parameters() if p.dim() >= 2]


@register_architecture("mlp")
def mlp(sizes: list[int]) -> nn.Sequential:
    """Bias-free fully connected layers `sizes[0] -> ... -> sizes[-1]` with ReLU between them."""
    if len(sizes) < 2 or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise InvalidArtifact(f"mlp sizes must be at least two positive integers, got {sizes!r}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers[f"relu{i}"] = nn.ReLU()
        layers[f"fc{i}"] = nn.Linear(fan_in, fan_out, bias=False)
    return nn.Sequential(layers)
