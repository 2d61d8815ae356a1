"""cl-lsg materialisation: a task's kernel-wise mask over the grown backbone, plus its head.

A cl-lsg task is computable from its own parts and any backbone version published with it or
after it:

- `growth_masks` holds, for every hidden layer LAYER (backbone weight `LAYER.weight`),
  `LAYER.kernels`: bool [out, in], the kernels the task uses (a kernel is one weight of a Linear
  layer, one [kh, kw] slice of a Conv2d), and `LAYER.channels`: bool [out], the units (channels)
  this task grew (the seed network's for the first task). `channels` is growth bookkeeping for the
  trainer and the reports; the forward pass needs only `kernels`.
- `head`: the task's own output layer, under the name of the network's last weight.

Effective weight of a hidden layer: `W[LAYER.weight] * kernels[:, :, None, ...]`; of the output
layer: the head. Later tasks only write kernels that no published task's `kernels` contains
(trainer/cl_lsg.py), so every backbone version from the task's own on gives it identical weights.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .errors import InvalidArtifact
from .materialize import Tensors, register_materializer

METHOD = "cl-lsg"


def layer_of(weight: str) -> str:
    """The LAYER of a weight name 'LAYER.weight', under which growth masks are keyed."""
    return weight.removesuffix(".weight")


def kernel_masked(weight: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in, *kernel] with every kernel outside the bool [out, in] `kernels` zeroed."""
    return weight * kernels.to(weight.dtype).view(*kernels.shape, *(1,) * (weight.dim() - 2))


def check_cl_lsg(parts: Mapping[str, Tensors], backbone: Tensors) -> None:
    """Raise InvalidArtifact unless the head replaces some backbone weights (same shapes) and every
    other backbone weight has bool [out, in] kernels (expected vs actual)."""
    masks, head = parts["growth_masks"], parts["head"]
    for name, tensor in head.items():
        if name not in backbone or tensor.shape != backbone[name].shape:
            shape = list(backbone[name].shape) if name in backbone else "no such weight"
            raise InvalidArtifact(f"{METHOD} head '{name}' has shape {list(tensor.shape)}, the backbone: {shape}")
    for name, weight in backbone.items():
        if name in head:
            continue
        key = f"{layer_of(name)}.kernels"
        kernels = masks.get(key)
        if kernels is None or kernels.dtype != torch.bool or kernels.shape != weight.shape[:2]:
            got = "nothing" if kernels is None else f"{kernels.dtype} {list(kernels.shape)}"
            raise InvalidArtifact(f"{METHOD} growth mask '{key}' must be bool {list(weight.shape[:2])}, got {got}")


@register_materializer(METHOD, parts=("growth_masks", "head"))
def _cl_lsg(backbone: Tensors, parts: Mapping[str, Tensors], shared: Mapping[str, Tensors]) -> dict[str, torch.Tensor]:
    check_cl_lsg(parts, backbone)
    masks, head = parts["growth_masks"], parts["head"]
    return {name: head[name] if name in head else kernel_masked(weight, masks[f"{layer_of(name)}.kernels"])
            for name, weight in backbone.items()}
