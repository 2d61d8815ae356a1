"""A thread's own copy of an architecture, filled with a task's tensors for one forward pass.

`torch.func.functional_call` walks the module tree and unties, swaps and restores every tensor on
each call: on the MLPs served here that bookkeeping cost more than the matrix products themselves
(about 70 µs a call at batch 1, `python -m bench forward_cost`). A `BoundModule` finds the
parameter and buffer slots once, then fills them by a dictionary store per tensor, runs the
module, and empties them again, so that no task's weights outlive the call (the LRU cache alone
decides what stays in memory). The arithmetic is the module's own: outputs are bit-identical to
`registry.forward`.

Note: a module copy must never be shared by two threads (the slots hold one task at a time);
`Snapshot` keeps one per thread.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from registry.errors import InvalidArtifact

# BatchNorm's batch counter is read only in training mode; eval-mode forwards never need it.
_UNUSED_IN_EVAL = "num_batches_tracked"


class BoundModule:
    """`module(x)` with every parameter and BatchNorm statistic taken from a `params` dict (strict:
    exactly the module's names, BatchNorm batch counters optional), like `registry.forward`, but
    without walking the tree per call."""

    def __init__(self, template: nn.Module):
        self.module = copy.deepcopy(template).eval()
        self._slots: list[tuple[str, dict, str]] = []  # (full name, the owning dict, key in it)
        counters = []  # BatchNorm batch counters: a task may carry them; they keep the copy's own
        for prefix, sub in self.module.named_modules():
            for store in (sub._parameters, sub._buffers):
                for key, value in store.items():
                    name = f"{prefix}.{key}" if prefix else key
                    if key == _UNUSED_IN_EVAL:
                        counters.append(name)
                    elif value is not None:  # None: e.g. a Linear without bias
                        self._slots.append((name, store, key))
        for _, store, key in self._slots:
            store[key] = None  # the copy's own initial values are never used: drop them
        self.names = frozenset(name for name, _, _ in self._slots)
        self._names_and_counters = self.names | frozenset(counters)

    def __call__(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The module's output for `x` with `params` in its slots (gradients flow when enabled)."""
        if params.keys() != self.names and params.keys() != self._names_and_counters:
            missing = sorted(self.names - params.keys())
            unexpected = sorted(params.keys() - self._names_and_counters)
            raise InvalidArtifact(f"the effective parameters do not fit the architecture: missing {missing}, "
                                  f"unexpected {unexpected}")
        try:
            for name, store, key in self._slots:
                store[key] = params[name]
            return self.module(x)
        finally:
            for _, store, key in self._slots:
                store[key] = None
