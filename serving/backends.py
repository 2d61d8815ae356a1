"""Inference backends: what computes a task's logits once the snapshot and task are known.

`pytorch` (the default) runs `torch.func.functional_call` over the architecture module;
`onnxruntime` runs the exported graph in ONNX Runtime (serving/onnx_backend.py). Both take the
task's weights from the same materialiser, so they agree to float32 rounding. Task-inference modes
that need gradients (oneshot, binary) always run on PyTorch: ONNX Runtime only runs forwards.
"""

from __future__ import annotations

from typing import Protocol

import torch

from registry.errors import unknown

from .snapshot import LoadedTask, Snapshot

PYTORCH = "pytorch"
ONNXRUNTIME = "onnxruntime"
BACKENDS = (PYTORCH, ONNXRUNTIME)


class Backend(Protocol):
    name: str

    def logits(self, snapshot: Snapshot, task: LoadedTask, x: torch.Tensor) -> torch.Tensor:
        """[N, classes of the task] logits of `x` [N, features] under `task`."""

    def logits_of(self, snapshot: Snapshot, tasks: list[LoadedTask], x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each task's logits of `x`, by task id (GN runs many tasks on one batch)."""


class PyTorchBackend:
    name = PYTORCH

    def logits(self, snapshot: Snapshot, task: LoadedTask, x: torch.Tensor) -> torch.Tensor:
        return snapshot.logits(task, x)

    def logits_of(self, snapshot: Snapshot, tasks: list[LoadedTask], x: torch.Tensor) -> dict[int, torch.Tensor]:
        return snapshot.logits_of(tasks, x)  # head-only tasks share one pass up to the output layer


def create_backend(name: str, *, threads: int | None = None) -> Backend:
    """The backend `name`; ONNX Runtime keeps its per-task sessions in each snapshot's cache and runs
    `threads` intra-op threads (None: its default, one per physical core)."""
    if name == PYTORCH:
        return PyTorchBackend()
    if name == ONNXRUNTIME:
        from .onnx_backend import OnnxRuntimeBackend  # imported here: a PyTorch server never loads ONNX Runtime

        return OnnxRuntimeBackend(threads=threads)
    raise unknown("backend", name, BACKENDS)
