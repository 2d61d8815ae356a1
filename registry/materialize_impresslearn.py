"""ImpressLearn materialisation: a task's alpha coefficients over the model's shared basis masks.

Effective weight of masked layer i: `W_i * sum_t alpha_{t,i} M_{t,i}` (a real-valued mask). The
basis masks are a model-level shared part (kind "basis_masks": bool [B, *weight shape] per masked
weight, held bitpacked: registry/packed.py); a task stores only alpha (kind "alpha": float [n] per masked weight).

Note (the append-only contract): a task's alpha may be *shorter* than the current basis. With a
heterogeneous basis, tasks 0..B-1 each add one mask and are published while the basis is still
growing, so task k's alpha has k + 1 coefficients. A task with n coefficients is combined with the
first n basis masks, and the trainer only ever appends to the basis (it refuses to publish a basis
that drops or changes an existing mask), so a published task computes the very same tensors, bit
for bit, however many masks are appended later. An alpha longer than the basis is refused.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .errors import InvalidArtifact
from .materialize import Tensors, register_materializer
from .packed import PackedMasks


def superpose(alpha: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The real-valued mask `sum_t alpha[t] * basis[t]`.

    Args:
        alpha: float [n] coefficients.
        basis: [n, *weight shape] masks (bool or float); exactly n of them.
    Returns:
        [*weight shape] in alpha's dtype. A one-hot alpha gives the selected mask exactly (0/1
        products and sums of zeros are exact in floating point), so such a task serves like SupSup.
    """
    return torch.tensordot(alpha, basis.to(alpha.dtype), dims=1)


def check_alpha(alpha: Tensors, basis: PackedMasks, backbone: Tensors) -> None:
    """Raise InvalidArtifact unless `alpha` and `basis` fit the backbone and each other."""
    if set(alpha) != set(backbone) or set(basis) != set(backbone):
        raise InvalidArtifact(
            f"ImpressLearn task has alpha for {sorted(alpha)} and basis masks for {sorted(basis)}, "
            f"but the backbone's masked weights are {sorted(backbone)}"
        )
    for name, weight in backbone.items():
        a, shape = alpha[name], basis.shapes[name]
        if a.dim() != 1 or a.numel() == 0:
            raise InvalidArtifact(f"alpha '{name}' must be a non-empty 1-D vector, got shape {list(a.shape)}")
        if tuple(shape[1:]) != tuple(weight.shape):
            raise InvalidArtifact(
                f"basis masks '{name}' have shape {list(shape)}, expected [B, {', '.join(map(str, weight.shape))}]"
            )
        if a.numel() > shape[0]:
            raise InvalidArtifact(
                f"alpha '{name}' has {a.numel()} coefficients but the model's basis has only {shape[0]} "
                "mask(s): a task can only combine basis masks that were published before it"
            )


@register_materializer("impresslearn", parts=("alpha",), shared=("basis_masks",))
def _impresslearn(backbone: Tensors, parts: Mapping[str, Tensors],
                  shared: Mapping[str, Tensors]) -> dict[str, torch.Tensor]:
    alpha, basis = parts["alpha"], PackedMasks.pack(shared["basis_masks"])
    check_alpha(alpha, basis, backbone)
    # [:n]: the first n masks, those that existed when the task was learned (module docstring).
    return {name: weight * superpose(alpha[name].to(weight.dtype), basis.as_float(name, weight.dtype)[: alpha[name].numel()])
            for name, weight in backbone.items()}
