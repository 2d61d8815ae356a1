"""The mean output entropy that task inference minimises, and its gradient with respect to weights
(the gradient modes of serving/task_inference.py need dH/dW once per request)."""

from __future__ import annotations

import math
from typing import Callable

import torch

Tensors = dict[str, torch.Tensor]


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the softmax entropy, divided by log(classes) (so in [0, 1])."""
    log_p = torch.log_softmax(logits, dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1).mean()
    return entropy / math.log(logits.shape[1]) if logits.shape[1] > 1 else entropy


def autograd_gradients(forward: Callable[[Tensors, torch.Tensor], torch.Tensor], params: Tensors, x: torch.Tensor,
                       classes: int, names: list[str]) -> Tensors:
    """dH/dW of the tensors `names` at `params` by autograd through `forward(params, x)`."""
    leaves = {n: params[n].detach().requires_grad_() for n in names}
    with torch.enable_grad():
        entropy = mean_entropy(forward(params | leaves, x)[:, :classes])
        return dict(zip(leaves, torch.autograd.grad(entropy, list(leaves.values()))))
