"""Artifact kinds: the typed parts a task (or, for shared parts, a model) stores.

Each kind names what its tensors must look like and which codecs may store it; `check_part`
validates a value against the backbone before it is written, so a malformed artifact is refused
at publish time with expected vs actual in the message, not discovered by a server later.

| kind          | per task or shared | value (dict of tensors)                                     |
|---------------|--------------------|-------------------------------------------------------------|
| masks         | task               | bool, one per masked backbone weight, same shape            |
| basis_masks   | shared             | bool [B, *weight shape] per masked weight: B basis masks    |
| alpha         | task               | float [B] per masked weight: coefficients over the basis    |
| head          | task               | float tensors of a per-task output layer                    |
| bn_stats      | task               | float 'LAYER.running_mean' / 'LAYER.running_var', 1-D pairs |
| growth_masks  | task               | bool 'LAYER.channels' [out], 'LAYER.kernels' [out, in]      |
| grown_weights | task               | float tensors of the channels a task grew                   |
| filter_mask   | task               | bool [out channels] per layer                               |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .errors import InvalidArtifact, unknown

Tensors = Mapping[str, torch.Tensor]
MASK_CODECS = ("bitmask/v1", "entropy-mask/v1")


@dataclass(frozen=True)
class ArtifactKind:
    name: str
    codecs: tuple[str, ...]  # the first is the default; masks pick the smallest of theirs
    check: Callable[[Tensors, Tensors], None]  # (value, backbone) -> raises InvalidArtifact


def _dtype(kind: str, value: Tensors, floating: bool) -> None:
    for name, tensor in value.items():
        ok = tensor.is_floating_point() if floating else tensor.dtype == torch.bool
        if not ok:
            raise InvalidArtifact(f"{kind} '{name}' must be {'floating point' if floating else 'boolean'}, got {tensor.dtype}")


def _per_weight(kind: str, value: Tensors, backbone: Tensors, shape: Callable[[torch.Tensor], tuple]) -> None:
    masked = {n: w for n, w in backbone.items() if w.dim() >= 2}
    if set(value) != set(masked):
        raise InvalidArtifact(f"{kind} has keys {sorted(value)} but the backbone's masked weights are {sorted(masked)}")
    for name, tensor in value.items():
        expected = shape(masked[name])
        if tuple(tensor.shape) != tuple(expected):
            raise InvalidArtifact(f"{kind} '{name}' has shape {list(tensor.shape)}, expected {list(expected)}")


def _check_masks(value: Tensors, backbone: Tensors) -> None:
    _dtype("mask", value, floating=False)
    _per_weight("mask", value, backbone, lambda w: w.shape)


def _check_basis(value: Tensors, backbone: Tensors) -> None:
    _dtype("basis mask", value, floating=False)
    sizes = {t.shape[0] for t in value.values() if t.dim()}
    if len(sizes) != 1:
        raise InvalidArtifact(f"basis masks must stack the same number of masks per layer, got {sorted(sizes)}")
    _per_weight("basis mask", value, backbone, lambda w: (sizes.copy().pop(), *w.shape))


def _check_alpha(value: Tensors, backbone: Tensors) -> None:
    _dtype("alpha", value, floating=True)
    if any(t.dim() != 1 for t in value.values()) or len({t.numel() for t in value.values()}) > 1:
        raise InvalidArtifact("alpha must be one 1-D vector of basis coefficients per masked weight, all the same length")
    _per_weight("alpha", value, backbone, lambda w: tuple(next(iter(value.values())).shape))


def _check_floats(kind: str):
    return lambda value, backbone: _dtype(kind, value, floating=True)


def _check_bn_stats(value: Tensors, backbone: Tensors) -> None:
    _dtype("bn_stats", value, floating=True)
    layers = {name.rsplit(".", 1)[0] for name in value}
    for layer in layers:
        mean, var = value.get(f"{layer}.running_mean"), value.get(f"{layer}.running_var")
        if mean is None or var is None or mean.dim() != 1 or mean.shape != var.shape:
            raise InvalidArtifact(f"bn_stats of '{layer}' need 1-D running_mean and running_var of one length")


def _check_growth(value: Tensors, backbone: Tensors) -> None:
    """'LAYER.channels' [out] and 'LAYER.kernels' [out, in] of the backbone weight 'LAYER.weight'."""
    _dtype("growth mask", value, floating=False)
    for name, tensor in value.items():
        layer, _, suffix = name.rpartition(".")
        if (suffix, tensor.dim()) not in {("channels", 1), ("kernels", 2)}:
            raise InvalidArtifact(f"growth mask '{name}': expected 'LAYER.channels' [C] or 'LAYER.kernels' [out, in]")
        weight = backbone.get(f"{layer}.weight")
        if weight is None or weight.dim() < 2:
            raise InvalidArtifact(f"growth mask '{name}': the backbone has no weight '{layer}.weight' with "
                                  f"[out, in, ...] dimensions (weights: {sorted(backbone)})")
        expected = tuple(weight.shape[: tensor.dim()])
        if tuple(tensor.shape) != expected:
            raise InvalidArtifact(f"growth mask '{name}' has shape {list(tensor.shape)}, expected {list(expected)}")


def _check_filter_mask(value: Tensors, backbone: Tensors) -> None:
    _dtype("filter mask", value, floating=False)
    if any(t.dim() != 1 for t in value.values()):
        raise InvalidArtifact("a filter mask holds one 1-D boolean vector (one entry per output filter) per layer")


KINDS: dict[str, ArtifactKind] = {
    kind.name: kind
    for kind in (
        ArtifactKind("masks", MASK_CODECS, _check_masks),
        ArtifactKind("basis_masks", MASK_CODECS, _check_basis),
        ArtifactKind("alpha", ("tensors/v1",), _check_alpha),
        ArtifactKind("head", ("tensors/v1",), _check_floats("head")),
        ArtifactKind("bn_stats", ("tensors/v1",), _check_bn_stats),
        ArtifactKind("growth_masks", MASK_CODECS, _check_growth),
        ArtifactKind("grown_weights", ("tensors/v1",), _check_floats("grown weight")),
        ArtifactKind("filter_mask", MASK_CODECS, _check_filter_mask),
    )
}


def get_kind(name: str) -> ArtifactKind:
    if name not in KINDS:
        raise unknown("artifact kind", name, KINDS)
    return KINDS[name]
