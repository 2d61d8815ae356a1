"""Task streams: a deterministic sequence of classification tasks built from offline data.

Task i of a stream depends only on (stream, seed, i), never on how many tasks are requested, so
training 3 tasks and later appending 2 gives the same tasks as training 5 at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from registry.errors import unknown


@dataclass(frozen=True)
class TaskData:
    """One task: train/test tensors (x float32 [N, features], y int64 in [0, num_classes))."""

    index: int
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


@dataclass(frozen=True)
class TaskStream:
    """A named, seeded sequence of tasks over one input space."""

    name: str
    seed: int
    input_shape: tuple[int, ...]
    num_classes: int
    max_tasks: int
    make_task: Callable[[int], TaskData]

    def task(self, index: int) -> TaskData:
        if not 0 <= index < self.max_tasks:
            raise ValueError(f"stream '{self.name}' has tasks 0..{self.max_tasks - 1}, not {index}")
        return self.make_task(index)


_STREAMS: dict[str, Callable[[int], TaskStream]] = {}


def register_stream(name: str):
    """Decorator: make a stream factory `factory(seed) -> TaskStream` available by name."""

    def decorate(factory: Callable[[int], TaskStream]) -> Callable[[int], TaskStream]:
        _STREAMS[name] = factory
        return factory

    return decorate


def get_stream(name: str, seed: int = 0) -> TaskStream:
    if name not in _STREAMS:
        raise unknown("stream", name, _STREAMS)
    return _STREAMS[name](seed)


def stream_names() -> list[str]:
    return sorted(_STREAMS)


@lru_cache(maxsize=4)
def _digits(seed: int) -> tuple[np.ndarray, ...]:
    """sklearn's 1797 8x8 digits (shipped with scikit-learn), scaled to [0, 1], split 80/20 stratified."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    return tuple(train_test_split(x, data.target.astype(np.int64), test_size=0.2, stratify=data.target, random_state=seed))


def _tensors(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


@register_stream("permuted-digits")
def permuted_digits(seed: int) -> TaskStream:
    """Every task: all ten digits, pixels shuffled by a fixed permutation drawn from (seed, task)."""

    def make_task(index: int) -> TaskData:
        x_train, x_test, y_train, y_test = _digits(seed)
        perm = np.random.default_rng([seed, index]).permutation(x_train.shape[1])
        xs = _tensors(x_train[:, perm], y_train, x_test[:, perm], y_test)
        return TaskData(index, f"perm-{index}", xs[0], xs[1], xs[2], xs[3], num_classes=10)

    return TaskStream("permuted-digits", seed, (64,), num_classes=10, max_tasks=10_000, make_task=make_task)


@register_stream("split-digits")
def split_digits(seed: int) -> TaskStream:
    """Five tasks of two classes each: (0,1), (2,3), ... relabelled 0/1."""

    def make_task(index: int) -> TaskData:
        x_train, x_test, y_train, y_test = _digits(seed)
        classes = (2 * index, 2 * index + 1)
        train, test = np.isin(y_train, classes), np.isin(y_test, classes)
        xs = _tensors(x_train[train], y_train[train] - 2 * index, x_test[test], y_test[test] - 2 * index)
        return TaskData(index, f"digits-{classes[0]}-{classes[1]}", xs[0], xs[1], xs[2], xs[3], num_classes=2)

    return TaskStream("split-digits", seed, (64,), num_classes=2, max_tasks=5, make_task=make_task)
