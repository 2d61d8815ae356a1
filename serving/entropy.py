"""The mean output entropy that task inference minimises, and its gradient with respect to weights.

The gradient modes (serving/task_inference.py) need dH/dW once per request. On the small MLPs
served here autograd's bookkeeping costs more than the arithmetic: on 64-128-128-10 at batch 16
(`python -m bench gn`, its table of the parts of a gradient mode), the first layer's gradient
costs 4.2-5.3x a task-given forward through autograd and 0.8-1.6x in closed form. So a plain MLP (bias-free Linear layers with ReLU between: registry's `mlp`
and `lenet300-100`) is differentiated by hand, any other architecture by autograd.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Tensors = dict[str, torch.Tensor]


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the softmax entropy, divided by log(classes) (so in [0, 1]): a scalar
    for logits [N, C]; for [K, N, C] (K outputs stacked), the K means at once."""
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1).mean(dim=-1)
    return entropy / math.log(logits.shape[-1]) if logits.shape[-1] > 1 else entropy


def mean_entropy_gradient(logits: torch.Tensor) -> torch.Tensor:
    """d mean_entropy / d logits, [N, C]: for one row, dH/dz_k = -p_k (log p_k + H), written as
    p log p - p * sum(p log p) (H = -sum(p log p)), one fused multiply-add: on the small batches of
    task inference each PyTorch call costs more than its arithmetic."""
    log_p = torch.log_softmax(logits, dim=1)
    p = log_p.exp()
    p_log_p = p * log_p
    scale = len(logits) * (math.log(logits.shape[1]) if logits.shape[1] > 1 else 1.0)
    return torch.addcmul(p_log_p, p, p_log_p.sum(dim=1, keepdim=True), value=-1.0).mul_(-1.0 / scale)


def linear_chain(module: nn.Module) -> list[str] | None:
    """The weight names, input layer first, when `module` is a plain MLP (an nn.Sequential of
    bias-free nn.Linear layers with an nn.ReLU between each two), else None."""
    if not isinstance(module, nn.Sequential):
        return None
    children = list(module.named_children())
    kinds = [type(child) for _, child in children]
    plain = bool(children) and all(k is nn.Linear for k in kinds[::2]) and all(k is nn.ReLU for k in kinds[1::2])
    if not plain or len(children) % 2 == 0 or any(child.bias is not None for _, child in children[::2]):
        return None
    return [f"{name}.weight" for name, _ in children[::2]]


def chain_forward(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The output of the plain MLP `weights` (input layer first) for `x`: the module's own operations
    (F.linear, relu), so bit-identical to calling it, without nn.Module's call chain (on MLP
    64-512-512-10 at batch 1 that chain cost about as much as the products; python -m bench forward_cost)."""
    for weight in weights[:-1]:
        x = torch.relu(F.linear(x, weight))
    return F.linear(x, weights[-1])


def chain_gradients(weights: list[torch.Tensor], x: torch.Tensor, classes: int,
                    wanted: list[int]) -> dict[int, torch.Tensor]:
    """dH/dW of the layers `wanted` (indices into `weights`) of the plain MLP `weights`, H the
    mean entropy of its first `classes` logits of `x`: one forward keeping the activations, then
    the backward pass written out (a ReLU passes gradient where its output is positive, as
    autograd's does)."""
    inputs = [x]
    for weight in weights[:-1]:
        inputs.append(F.linear(inputs[-1], weight).relu_())
    logits = F.linear(inputs[-1], weights[-1])
    width = logits.shape[1]
    delta = mean_entropy_gradient(logits if classes == width else logits[:, :classes])  # [N, classes]
    if classes < width:
        delta = F.pad(delta, (0, width - classes))
    gradients, lowest = {}, min(wanted)
    for layer in range(len(weights) - 1, lowest - 1, -1):
        if layer in wanted:
            gradients[layer] = delta.T @ inputs[layer]
        if layer > lowest:  # ReLU's backward in one call: zero where its output is not positive
            delta = torch.ops.aten.threshold_backward(delta @ weights[layer], inputs[layer], 0)
    return gradients


def autograd_gradients(forward: Callable[[Tensors, torch.Tensor], torch.Tensor], params: Tensors, x: torch.Tensor,
                       classes: int, names: list[str]) -> Tensors:
    """dH/dW of the tensors `names` at `params` by autograd through `forward(params, x)`."""
    leaves = {n: params[n].detach().requires_grad_() for n in names}
    with torch.enable_grad():
        entropy = mean_entropy(forward(params | leaves, x)[:, :classes])
        return dict(zip(leaves, torch.autograd.grad(entropy, list(leaves.values()))))
