"""SupSup: one edge-popup supermask per task over a fixed signed-constant random backbone.

Only the per-task scores train. The mask keeps the top `density` fraction of |scores| in each
layer; the backward pass is straight-through (the mask's gradient goes to the scores as is, and
picks up sign(s) through |s|). Masks are attached with torch.nn.utils.parametrize, so the
architecture module stays a plain network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from registry.architectures import maskable_parameters
from registry.codecs import signed_constant

from .methods import Method, TaskArtifact, TrainingContext, register_method
from .streams import TaskData


class _TopK(torch.autograd.Function):
    """Binary mask of the k largest entries; gradient passed straight through."""

    @staticmethod
    def forward(ctx, magnitudes: torch.Tensor, density: float) -> torch.Tensor:
        k = max(1, round(density * magnitudes.numel()))
        mask = torch.zeros_like(magnitudes)
        mask.view(-1)[magnitudes.flatten().topk(k, sorted=False).indices] = 1.0
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class EdgePopupMask(nn.Module):
    """Parametrization W -> W * mask(scores): the scores are this task's only trainable tensor."""

    def __init__(self, shape: torch.Size, density: float, generator: torch.Generator):
        super().__init__()
        self.density = density
        self.scores = nn.Parameter(torch.empty(shape))
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5), generator=generator)

    def mask(self) -> torch.Tensor:
        return _TopK.apply(self.scores.abs(), self.density)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask()


@dataclass
class SupSupConfig:
    density: float = 0.5  # fraction of each layer's weights a mask keeps
    epochs: int = 30
    lr: float = 0.3
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 1e-4

    def __post_init__(self):
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")


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
        scores = [m.scores for m in masks.values()]
        optimizer = torch.optim.SGD(scores, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
        n = len(task.y_train)
        bar = tqdm(range(cfg.epochs), desc=f"task {task.index} ({task.name})", unit="epoch", leave=False, disable=None)
        for _ in bar:
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, cfg.batch_size):
                batch = order[start : start + cfg.batch_size]
                logits = module(task.x_train[batch])[:, : task.num_classes]
                loss = F.cross_entropy(logits, task.y_train[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            schedule.step()
            bar.set_postfix(loss=f"{total / n:.3f}")
        with torch.no_grad():
            result = {name: m.mask().to(torch.bool) for name, m in masks.items()}
        density = sum(int(m.sum()) for m in result.values()) / sum(m.numel() for m in result.values())
        return TaskArtifact(parts={"masks": result}, metrics={"density": density})

    def _attach(self, module: nn.Module, backbone: dict[str, torch.Tensor], generator) -> dict[str, EdgePopupMask]:
        masks = {}
        for name, weight in backbone.items():
            owner, attr = name.rsplit(".", 1)
            layer = module.get_submodule(owner)
            with torch.no_grad():
                getattr(layer, attr).copy_(weight)
            getattr(layer, attr).requires_grad_(False)
            masks[name] = EdgePopupMask(weight.shape, self.config.density, generator)
            parametrize.register_parametrization(layer, attr, masks[name])
        return masks
