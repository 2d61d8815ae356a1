"""Task inference (GN): choose the task of an unlabeled batch when the caller does not name one.

* `exhaustive`: run every task and pick the lowest mean output entropy, normalised by log(classes)
  so tasks with different class counts compare fairly. Exact; cost grows with the task count.
* `oneshot` (SupSup): superpose all task masks with alpha_i = 1/T, take one gradient of the mean
  output entropy with respect to alpha, and pick the task whose alpha lowers it fastest
  (the most negative gradient). Needs mask-based tasks of one backbone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from registry import forward
from registry.errors import unknown

from .errors import InvalidRequest
from .snapshot import LoadedTask, Snapshot


@dataclass(frozen=True)
class TaskChoice:
    """The inferred task, the mode that chose it, and each candidate's score (lower is better)."""

    task: LoadedTask
    mode: str
    scores: dict[int, float]
    logits: torch.Tensor | None = None  # the chosen task's logits, when the mode computed them


_MODES: dict[str, Callable[[Snapshot, torch.Tensor], TaskChoice]] = {}


def register_mode(name: str):
    def decorate(fn):
        _MODES[name] = fn
        return fn

    return decorate


def mode_names() -> list[str]:
    return sorted(_MODES)


def infer_task(mode: str, snapshot: Snapshot, x: torch.Tensor) -> TaskChoice:
    if mode not in _MODES:
        raise InvalidRequest(str(unknown("task_inference mode", mode, _MODES)))
    if not snapshot.healthy_tasks():
        raise InvalidRequest(f"model '{snapshot.model}' has no task in service to infer from")
    return _MODES[mode](snapshot, x)


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the softmax entropy, divided by log(classes) (so in [0, 1])."""
    log_p = torch.log_softmax(logits, dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1).mean()
    return entropy / math.log(logits.shape[1]) if logits.shape[1] > 1 else entropy


@register_mode("exhaustive")
def exhaustive(snapshot: Snapshot, x: torch.Tensor) -> TaskChoice:
    logits = {t.entry.id: snapshot.logits(t, x) for t in snapshot.healthy_tasks()}
    scores = {i: float(mean_entropy(out)) for i, out in logits.items()}
    best = min(scores, key=lambda i: (scores[i], i))
    return TaskChoice(snapshot.tasks[best], "exhaustive", scores, logits[best])


@register_mode("oneshot")
def oneshot(snapshot: Snapshot, x: torch.Tensor) -> TaskChoice:
    ids, stack = snapshot.mask_stack()
    backbones = {t.entry.backbone for t in snapshot.healthy_tasks()}
    if not ids or len(ids) != len(snapshot.healthy_tasks()) or len(backbones) != 1:
        raise InvalidRequest(
            f"task_inference 'oneshot' needs mask-based tasks on one backbone; model '{snapshot.model}' "
            "does not have them: use 'exhaustive'"
        )
    backbone = snapshot.backbones[backbones.pop()]
    classes = max(snapshot.tasks[i].entry.num_classes for i in ids)
    alpha = torch.full((len(ids),), 1.0 / len(ids), requires_grad=True)
    with torch.enable_grad():
        params = {n: w * torch.tensordot(alpha, stack[n], dims=1) for n, w in backbone.items()}
        entropy = mean_entropy(forward(snapshot.module, params, x)[:, :classes])
        (gradient,) = torch.autograd.grad(entropy, alpha)
    scores = dict(zip(ids, gradient.tolist()))
    best = min(ids, key=lambda i: (scores[i], i))
    return TaskChoice(snapshot.tasks[best], "oneshot", scores)
