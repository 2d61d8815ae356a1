"""EWC: elastic weight consolidation (Kirkpatrick et al., PNAS 2017), the regularisation baseline.

The whole network trains with a per-task head (trainer/heads.py). After each task the diagonal of
the empirical Fisher information of the backbone weights (the mean over the task's training
examples of the squared per-example gradient of the cross-entropy, computed with torch.func's
vmap(grad)) is added to the Fisher accumulated over earlier tasks (online EWC with decay 1). While
training a later task the loss gains (penalty / 2) * sum(F * (w - w_prev)^2), w_prev being the
newest backbone (the weights after the previous task); its gradient penalty * F * (w - w_prev) is
added to the backbone gradient before each step. The accumulated Fisher is the task's training
state, so a later `maskbank train` run continues exactly; servers never load it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .heads import HeadConfig, HeadMethod, latest_state
from .methods import Tensors, TrainingContext, register_method, require
from .streams import TaskData

FISHER = "fisher"


@dataclass
class EWCConfig(HeadConfig):
    penalty: float = 100.0  # lambda of the quadratic penalty; SGD is stable while lr * penalty * max(F) < 2

    def __post_init__(self):
        super().__post_init__()
        require(self, ">= 0", "penalty")


def fisher_diagonal(module: nn.Module, trained: Tensors, head: str, task: TaskData, batch_size: int) -> Tensors:
    """Mean over the task's training examples of the squared per-example gradient of the
    cross-entropy, for every backbone weight (the head excluded)."""
    weights = {n: w for n, w in trained.items() if n != head}
    fixed = {head: trained[head]}
    classes = task.num_classes

    def loss(params: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(module, {**fixed, **params}, (x.unsqueeze(0),))
        return F.cross_entropy(logits[:, :classes], y.unsqueeze(0))

    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
    total = {n: torch.zeros_like(w) for n, w in weights.items()}
    for start in range(0, len(task.y_train), batch_size):
        grads = per_example(weights, task.x_train[start : start + batch_size], task.y_train[start : start + batch_size])
        for n, g in grads.items():
            total[n] += g.pow(2).sum(dim=0)
    return {n: t / len(task.y_train) for n, t in total.items()}


@register_method
class EWC(HeadMethod):
    name = "ewc"
    Config = EWCConfig

    def protect(self, params: dict[str, nn.Parameter], head: str, context: TrainingContext) -> Callable[[], None]:
        fisher = latest_state(context, FISHER)
        if fisher is None or self.config.penalty == 0:
            return lambda: None
        anchor = {n: context.backbone[n] for n in fisher}
        strength = {n: self.config.penalty * f for n, f in fisher.items()}

        def penalise() -> None:
            with torch.no_grad():
                for n, s in strength.items():
                    if params[n].grad is not None:
                        params[n].grad.add_(s * (params[n] - anchor[n]))

        return penalise

    def consolidate(self, module: nn.Module, trained: Tensors, head: str, task: TaskData,
                    context: TrainingContext) -> tuple[dict[str, Tensors], dict]:
        fisher = fisher_diagonal(module, trained, head, task, self.config.batch_size)
        if (accumulated := latest_state(context, FISHER)) is not None:
            fisher = {n: fisher[n] + accumulated[n] for n in fisher}
        return {FISHER: fisher}, {}
