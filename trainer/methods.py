"""The method interface: how a continual-learning method plugs into the trainer.

A method creates the shared backbone once per model and learns one task at a time, returning
that task's artifact (typed parts, one per artifact kind of registry/kinds.py). Methods are
registered by name with `@register_method` and built with `get_method(name, **config)`; each has a
dataclass config whose unknown keys are errors and whose resolved values are saved in the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from registry import maskable_parameters
from registry.errors import MaskbankError, unknown

from .streams import TaskData


Tensors = dict[str, torch.Tensor]


@dataclass
class TaskArtifact:
    """What learning one task produced.

    parts: the served per-task parts, by artifact kind (registry/kinds.py: the registry checks
        each against the backbone and picks its codec).
    metrics: figures recorded with the task.
    state: training-only tensors a later task or a later `maskbank train` run needs (KKT's
        scores, SPG's importance); stored with the task, never loaded by servers.
    backbone: the new shared weights if the method trained them; published as a new backbone
        version (a sparse delta of the previous one when smaller) that this task uses.
    shared: model-level parts to publish or replace (ImpressLearn's basis masks), by kind.
    shares: earlier task ids whose frozen subnetworks this task reuses.
    """

    parts: dict[str, Tensors]
    metrics: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Tensors] = field(default_factory=dict)
    backbone: Tensors | None = None
    shared: dict[str, Tensors] = field(default_factory=dict)
    shares: tuple[int, ...] = ()


@dataclass(frozen=True)
class PublishedTask:
    """An earlier task as a method sees it: its parts and training state, decoded."""

    id: int
    name: str
    num_classes: int
    backbone: str  # the backbone version it is served with
    parts: dict[str, Tensors]
    state: dict[str, Tensors]
    shares: tuple[int, ...] = ()


@dataclass(frozen=True)
class TrainingContext:
    """What a method may read (never modify) about the model it extends."""

    architecture: dict[str, Any]
    backbone: Tensors  # the newest backbone version
    tasks: list[PublishedTask]
    shared: dict[str, Tensors]


class Method(ABC):
    """A continual-learning method. Subclasses set `name`, `backbone_codec` and a `Config` dataclass."""

    name: ClassVar[str]
    backbone_codec: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any):
        self.config = config

    @abstractmethod
    def create_backbone(self, module: nn.Module, generator: torch.Generator) -> Tensors:
        """The shared weights of a new model built on `module`."""

    @abstractmethod
    def learn_task(
        self, module: nn.Module, task: TaskData, generator: torch.Generator, context: TrainingContext
    ) -> TaskArtifact:
        """Learn `task` on `module` (a fresh, plain instance of the architecture). Must not modify
        anything in `context`: new weights go into the artifact's `backbone`."""


def he_normal(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A He-normal (ReLU) initialised weight shaped like `like`, drawn from `generator`."""
    weight = torch.empty_like(like)
    nn.init.kaiming_normal_(weight, nonlinearity="relu", generator=generator)
    return weight


def he_normal_backbone(module: nn.Module, generator: torch.Generator) -> Tensors:
    """A trained method's first backbone: every weight of `module`, He-normal initialised."""
    return {name: he_normal(module.get_parameter(name), generator) for name in maskable_parameters(module)}


_RULES = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    ">= 2": lambda v: v >= 2,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in (0, 1)": lambda v: 0 < v < 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
}


def require(config: Any, rule: str, *names: str) -> None:
    """ValueError naming the first option of `names` whose value in `config` breaks `rule` (a key
    of _RULES, e.g. "> 0"). NaN breaks every rule. For a Config's __post_init__: out-of-range
    settings (a negative learning rate, an empty batch) are refused before any training."""
    for name in names:
        value = getattr(config, name)
        if not _RULES[rule](value):
            raise ValueError(f"{name} must be {rule}, got {value}")


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
    hints = typing.get_type_hints(cls.Config)
    typed = {k: _typed(name, k, hints.get(k), v) for k, v in overrides.items()}
    try:
        return cls(cls.Config(**typed))
    except ValueError as error:  # a Config's own range checks (its __post_init__)
        raise MaskbankError(f"method '{name}': {error}") from error


def refuse_inert(method: Method, given: Iterable[str]) -> None:
    """MaskbankError if an option a user gave (`given`: their names) does nothing under `method`'s
    config (its Config's INERT: `--density` with `--mask sign`), rather than ignore it. Only for what
    a user gave: a model's stored settings hold every option, its defaults included.

    An INERT entry is (other option, its value or a predicate on it, why)."""
    for key in given:
        for other, value, why in getattr(type(method.config), "INERT", {}).get(key, ()):
            current = getattr(method.config, other)
            if value(current) if callable(value) else current == value:
                raise MaskbankError(f"method '{method.name}': option '{key}' has no effect with {other}={current!r} "
                                    f"({why}); omit it")


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _typed(method: str, option: str, hint: Any, value: Any) -> Any:
    """`value` as option `option`'s declared type (bool, int, float, str, or one of them | None; an
    integer is a valid float), else MaskbankError: a config of the wrong type fails late, deep in
    training, with a message about something else. Other declared types are left to the config."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if any(kind not in _KINDS for kind in kinds if kind is not type(None)):
        return value  # a type this check does not know (a plugin's list, say): its config decides
    for kind in kinds:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _float_option(method, option, float(value))
        if kind is int and isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_OPTION_MAX:
            raise MaskbankError(f"option '{option}' of method '{method}' must be at most {INT_OPTION_MAX:,} in size, got "
                                f"{value}: counts that large overflowed deep in training (a traceback)")
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):  # True is an int to Python
            return value
    if str in kinds and isinstance(value, (int, float, bool)):  # `--set share=0`: JSON read the text as a number
        return json.dumps(value)
    wanted = " or ".join(_KINDS[kind] for kind in kinds if kind is not type(None))
    raise MaskbankError(f"option '{option}' of method '{method}' must be {wanted}, got {value!r}")


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
INT_OPTION_MAX = 2**31 - 1  # what every count a method takes fits in (tqdm's and torch's C integers)


def _float_option(method: str, option: str, value: float) -> float:
    """`value`, unless training (in float32) cannot use it: `--lr inf` trained NaN scores into masks of
    nothing learned, and `--lr 1e300` failed deep in the optimizer with a traceback."""
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise MaskbankError(f"option '{option}' of method '{method}' must be a finite number within float32's "
                            f"range (+-{FLOAT32_MAX:.3g}: training computes in float32), got {value!r}")
    return value


def method_defaults(name: str) -> dict[str, Any]:
    """The default of every option of method `name`'s config."""
    if name not in _METHODS:
        raise unknown("method", name, _METHODS)
    return dataclasses.asdict(_METHODS[name].Config())


def method_names() -> list[str]:
    return sorted(_METHODS)
