"""SupSup: one edge-popup supermask per task over a fixed signed-constant random backbone.

Only the per-task scores train. The mask keeps the top `density` fraction of |scores| in each
layer; the backward pass is straight-through (the mask's gradient goes to the scores as is, and
picks up sign(s) through |s|). Masks are attached with torch.nn.utils.parametrize, so the
architecture module stays a plain network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from registry.architectures import maskable_parameters
from registry.codecs import signed_constant

from .fit import fit
from .methods import Method, TaskArtifact, TrainingContext, register_method, require
from .streams import TaskData


def attach_frozen(module: nn.Module, backbone: dict[str, torch.Tensor],
                  make: Callable[[str, torch.Tensor], nn.Module]) -> dict[str, nn.Module]:
    """Load `backbone` into `module`, freeze it, and put the parametrization `make(name, weight)` on
    every backbone weight (in the backbone's order); return the parametrizations by weight name."""
    attached = {}
    for name, weight in backbone.items():
        owner, attr = name.rsplit(".", 1)
        layer = module.get_submodule(owner)
        with torch.no_grad():
            getattr(layer, attr).copy_(weight)
        getattr(layer, attr).requires_grad_(False)
        attached[name] = make(name, weight)
        parametrize.register_parametrization(layer, attr, attached[name])
    return attached


def batchnorm_statistics(module: nn.Module) -> dict[str, torch.Tensor]:
    """The running means and variances of every BatchNorm layer (empty for a network without BN)."""
    return {name: buffer.detach().clone() for name, buffer in module.named_buffers()
            if name.endswith((".running_mean", ".running_var"))}


class _TopK(torch.autograd.Function):
    """Binary mask of the k largest entries; gradient passed straight through.

    The mask is always exactly `_by_topk`'s (torch.topk). For large float32 CPU tensors `_by_selection`
    finds the k-th largest value t in O(n) instead, with a radix histogram, and keeps `magnitudes >= t`;
    it hands back to topk whenever that set could differ from topk's: ties at t (which of the tied
    entries topk keeps is its own choice), NaN or inf (topk ranks NaN largest), negative values or -0.0;
    other dtypes, devices and non-contiguous tensors always take topk's path.
    """

    SELECTION_MIN_NUMEL = 32768  # below this topk is as fast or faster (measured on 1 CPU thread); same mask

    @staticmethod
    def forward(ctx, magnitudes: torch.Tensor, density: float) -> torch.Tensor:
        k = max(1, round(density * magnitudes.numel()))
        mask = _TopK._by_selection(magnitudes, k)
        return _TopK._by_topk(magnitudes, k) if mask is None else mask

    @staticmethod
    def _by_topk(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
        mask = torch.zeros_like(magnitudes)
        mask.view(-1)[magnitudes.flatten().topk(k, sorted=False).indices] = 1.0
        return mask

    @staticmethod
    def _by_selection(magnitudes: torch.Tensor, k: int) -> torch.Tensor | None:
        """The top-k mask as `magnitudes >= t`, t the k-th largest entry, or None when that set might
        not be topk's (or the fast path does not apply).

        Finite non-negative float32 values order like their bit patterns as int32, so the top 16 bits
        (sign, exponent, 7 mantissa bits) put every entry in one of 2^15 ordered buckets: a bincount
        of them and a cumulative sum from the top find the bucket that holds the k-th largest entry
        and how many entries lie above it; a kthvalue over that bucket's few entries gives t. If
        exactly k entries are >= t, the k largest are unique and this is exactly topk's set.
        """
        n = magnitudes.numel()
        if (n < _TopK.SELECTION_MIN_NUMEL or magnitudes.dtype != torch.float32 or magnitudes.device.type != "cpu"
                or not magnitudes.is_contiguous()):
            return None
        flat = magnitudes.view(-1)
        high = flat.view(torch.int32) >> 16
        if int(high.min()) < 0:  # a sign bit: negative values, -0.0 or -NaN
            return None
        counts = torch.bincount(high, minlength=1 << 15)
        if int(counts[0x7F80:].sum()):  # exponent all ones: inf or NaN
            return None
        above = counts.flip(0).cumsum(0)  # above[i]: entries in buckets >= 2^15 - 1 - i
        i = int(torch.searchsorted(above, k))  # the first i with above[i] >= k
        before = int(above[i - 1]) if i else 0  # entries in the buckets above the k-th largest's
        candidates = flat[high == (1 << 15) - 1 - i]
        threshold = candidates.kthvalue(len(candidates) - (k - before) + 1).values
        if before + int((candidates >= threshold).sum()) != k:  # ties at the threshold
            return None
        return (magnitudes >= threshold).to(magnitudes.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _SignThreshold(torch.autograd.Function):
    """Binary mask of the non-negative scores; gradient passed straight through."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        return (scores >= 0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


MASK_RULES = ("topk", "sign")


class EdgePopupMask(nn.Module):
    """Parametrization W -> W * mask(scores): the scores are this task's only trainable tensor.

    rule 'topk' keeps the `density` fraction of largest |scores| in the layer (edge-popup);
    'sign' keeps the weights whose score is >= 0 (SupSup's cheaper variant; density then follows
    from training).
    """

    def __init__(self, shape: torch.Size, density: float, generator: torch.Generator, rule: str = "topk"):
        super().__init__()
        self.density = density
        self.rule = rule
        self.scores = nn.Parameter(torch.empty(shape))
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5), generator=generator)

    def mask(self) -> torch.Tensor:
        if self.rule == "sign":
            return _SignThreshold.apply(self.scores)
        return _TopK.apply(self.scores.abs(), self.density)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask()


@dataclass
class SupSupConfig:
    density: float = 0.5  # fraction of each layer's weights a mask keeps (rule 'topk')
    mask: str = "topk"  # 'topk' at `density`, or 'sign' (scores >= 0)
    epochs: int = 30
    lr: float = 0.3
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # options that do nothing under another option's value (trainer.refuse_inert refuses them when given)
    INERT: ClassVar[dict] = {"density": [("mask", "sign", "a sign mask keeps the weights whose score is >= 0")]}

    def __post_init__(self):
        require(self, "in (0, 1]", "density")
        require(self, ">= 1", "epochs")  # 0 published untrained masks, below chance, as tasks for good
        require(self, ">= 0", "weight_decay")
        require(self, "> 0", "lr")
        require(self, ">= 1", "batch_size")
        require(self, "in [0, 1)", "momentum")
        if self.mask not in MASK_RULES:
            raise ValueError(f"mask must be one of {MASK_RULES}, got {self.mask!r}")


@register_method
class SupSup(Method):
    name = "supsup"
    backbone_codec = "signed-constant/v1"
    Config = SupSupConfig

    def create_backbone(self, module: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
        params = dict(module.named_parameters())
        return {name: signed_constant(tuple(params[name].shape), generator) for name in maskable_parameters(module)}

    def learn_task(self, module: nn.Module, task: TaskData, generator: torch.Generator, context: TrainingContext) -> TaskArtifact:
        cfg = self.config
        masks = self._attach(module, context.backbone, generator)
        fit(module, task, [m.scores for m in masks.values()], epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, generator=generator,
            desc=f"task {task.index} ({task.name})")
        with torch.no_grad():
            result = {name: m.mask().to(torch.bool) for name, m in masks.items()}
        density = sum(int(m.sum()) for m in result.values()) / sum(m.numel() for m in result.values())
        parts = {"masks": result}
        if stats := batchnorm_statistics(module):  # gathered while training this task: per-task BN
            parts["bn_stats"] = stats
        return TaskArtifact(parts=parts, metrics={"density": density})

    def _attach(self, module: nn.Module, backbone: dict[str, torch.Tensor], generator) -> dict[str, EdgePopupMask]:
        cfg = self.config
        return attach_frozen(module, backbone, lambda name, w: EdgePopupMask(w.shape, cfg.density, generator, cfg.mask))
