"""The method interface: how a continual-learning method plugs into the trainer.

A method creates the shared backbone once per model and learns one task at a time, returning
that task's artifact (typed parts, one per artifact kind of registry/kinds.py). Methods are
registered by name with `@register_method` and built with `get_method(name, **config)`; each has a
dataclass config whose unknown keys are errors and whose resolved values are saved in the manifest.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from registry.errors import MaskbankError, unknown

from .streams import TaskData


@dataclass
class TaskArtifact:
    """What learning one task produced: `parts[kind] = tensors` (kinds: registry/kinds.py; the
    registry checks each part against the backbone and picks its codec) plus training metrics."""

    parts: dict[str, dict[str, torch.Tensor]]
    metrics: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    """A continual-learning method. Subclasses set `name`, `backbone_codec` and a `Config` dataclass."""

    name: ClassVar[str]
    backbone_codec: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any):
        self.config = config

    @abstractmethod
    def create_backbone(self, module: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The shared weights of a new model built on `module`."""

    @abstractmethod
    def learn_task(
        self, module: nn.Module, backbone: dict[str, torch.Tensor], task: TaskData, generator: torch.Generator
    ) -> TaskArtifact:
        """Learn `task` on a fresh copy of `module` carrying `backbone`; must not change `backbone`."""


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a Method subclass available by its `name`."""
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str, **config: Any) -> Method:
    """Build method `name` with `config` overrides (None values keep the default)."""
    if name not in _METHODS:
        raise unknown("method", name, _METHODS)
    cls = _METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    overrides = {k: v for k, v in config.items() if v is not None}
    if extra := set(overrides) - fields:
        raise MaskbankError(f"method '{name}' has no option(s) {sorted(extra)} (options: {sorted(fields)})")
    return cls(cls.Config(**overrides))


def method_names() -> list[str]:
    return sorted(_METHODS)
