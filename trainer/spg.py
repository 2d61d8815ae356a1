"""SPG: parameter-level soft masking (Konishi et al., ICML 2023).

The whole network trains and each task has its own head (trainer/heads.py). After task t, every
backbone weight gets an importance in [0, 1]: for each source (a) the cross-entropy of head t and
(b) for each earlier head j the sum of head j's logits on task t's data (cross-head importance),
the gradient is summed over task t's training batches, standardised over the tensor's elements
((g - mean) / std, unbiased std; a tensor whose gradient is all zero gets importance 0) and
mapped to |tanh(.)|; the sources are combined by element-wise max, and so is the result with the
importance accumulated over earlier tasks (starting at 0).

While training a later task, each backbone gradient is multiplied by (1 - accumulated importance)
and the head's by 1 - the mean accumulated importance over all backbone elements; the forward pass
is unchanged. With plain SGD (no momentum, no weight decay, the default) a weight of importance 1
therefore never moves. The accumulated importance is the task's training state, so a later
`maskbank train` run continues exactly where this one stopped; servers never load it.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .heads import HeadMethod, latest_state
from .methods import Tensors, TrainingContext, register_method
from .streams import TaskData

IMPORTANCE = "importance"


def standardised_importance(gradient: torch.Tensor) -> torch.Tensor:
    """|tanh((g - mean) / std)| over the tensor's elements; zeros when the gradient carries no signal."""
    if gradient.numel() < 2 or not gradient.any():
        return torch.zeros_like(gradient)
    std = gradient.std()
    if std == 0:
        return torch.zeros_like(gradient)
    return torch.tanh((gradient - gradient.mean()) / std).abs()


Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels)


def summed_gradients(module: nn.Module, params: Tensors, names: Iterable[str], batches: Iterable[Batch],
                     objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Tensors:
    """Gradient of `objective(logits, labels)` w.r.t. the weights `names`, summed over batches."""
    names = list(names)
    weights = {n: params[n].detach().requires_grad_(True) for n in names}
    fixed = {n: p.detach() for n, p in params.items() if n not in weights}
    total = {n: torch.zeros_like(w) for n, w in weights.items()}
    for x, y in batches:
        logits = torch.func.functional_call(module, {**fixed, **weights}, (x,))
        grads = torch.autograd.grad(objective(logits, y), list(weights.values()), allow_unused=True)
        for n, g in zip(weights, grads):
            if g is not None:
                total[n] += g
    return total


def task_importance(module: nn.Module, trained: Tensors, head: str, task: TaskData,
                    earlier_heads: list[tuple[torch.Tensor, int]], batch_size: int) -> Tensors:
    """Importance of every backbone weight for `task` (element-wise max over its sources)."""
    backbone = [n for n in trained if n != head]
    batches = [(task.x_train[i : i + batch_size], task.y_train[i : i + batch_size]) for i in range(0, len(task.y_train), batch_size)]
    classes = task.num_classes
    sources = [(trained, lambda logits, y: F.cross_entropy(logits[:, :classes], y))]
    for weight, head_classes in earlier_heads:
        sources.append(({**trained, head: weight}, lambda logits, y, c=head_classes: logits[:, :c].sum()))
    importance = {n: torch.zeros_like(trained[n]) for n in backbone}
    was_training = module.training
    module.train()
    try:
        for params, objective in sources:
            gradients = summed_gradients(module, params, backbone, batches, objective)
            for n in backbone:
                importance[n] = torch.maximum(importance[n], standardised_importance(gradients[n]))
    finally:
        module.train(was_training)
    return importance


@register_method
class SPG(HeadMethod):
    name = "spg"

    def protect(self, params: dict[str, nn.Parameter], head: str, context: TrainingContext) -> Callable[[], None]:
        accumulated = latest_state(context, IMPORTANCE)
        if accumulated is None:
            return lambda: None
        keep = {n: 1 - accumulated[n] for n in accumulated}
        # a float mean: summed in the module's parameter order, not the dict's (a state decoded from the
        # registry came in another order, and an appended task trained with a scale 2 ulps off)
        head_scale = 1 - float(torch.cat([accumulated[n].flatten() for n in params if n in accumulated]).mean())

        def scale() -> None:
            for n, factor in keep.items():
                if params[n].grad is not None:
                    params[n].grad.mul_(factor)
            if params[head].grad is not None:
                params[head].grad.mul_(head_scale)

        return scale

    def consolidate(self, module: nn.Module, trained: Tensors, head: str, task: TaskData,
                    context: TrainingContext) -> tuple[dict[str, Tensors], dict]:
        earlier = [(t.parts["head"][head], t.num_classes) for t in context.tasks]
        importance = task_importance(module, trained, head, task, earlier, self.config.batch_size)
        if (accumulated := latest_state(context, IMPORTANCE)) is not None:
            importance = {n: torch.maximum(importance[n], accumulated[n]) for n in importance}
        total = sum(v.numel() for v in importance.values())
        blocked = sum(int((v == 1).sum()) for v in importance.values()) / total
        mean = sum(float(v.sum()) for v in importance.values()) / total
        return {IMPORTANCE: importance}, {"blocked_fraction": blocked, "mean_importance": mean}

