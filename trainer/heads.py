"""Methods that train the whole network and give each task its own head.

Task t starts from the newest backbone, gets a fresh output layer (its head, initialised from the
task's generator) and trains everything with the shared SGD loop (trainer/fit.py). It publishes
the head as its only part and the trained network as a new backbone version (a sparse delta of
the previous one where smaller); the head's slot in the backbone keeps its old value, so the
backbone never carries a task's head. Earlier tasks are then served on the newest backbone
(registry/materialize_heads.py): what later tasks change is the method's forgetting, measured as
BWT.

`HeadMethod` is the common base; a subclass protects earlier tasks by overriding `protect`
(a hook run between backward and the optimiser step, e.g. SPG's gradient scaling or EWC's penalty
gradient) and `consolidate` (the training state a later task needs). Fine-tuning, the NCL
baseline, protects nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from registry import head_name
from registry.errors import MaskbankError

from .fit import fit
from .methods import Method, TaskArtifact, Tensors, TrainingContext, he_normal, he_normal_backbone, register_method, require
from .streams import TaskData


@dataclass
class HeadConfig:
    epochs: int = 10
    lr: float = 0.05  # SGD, cosine schedule
    momentum: float = 0.0  # plain SGD as SPG's reference; with momentum a scaled-to-zero gradient could still move a weight
    batch_size: int = 64

    def __post_init__(self):
        require(self, ">= 1", "epochs", "batch_size")  # 0 epochs published an untrained head for good
        require(self, "> 0", "lr")
        require(self, "in [0, 1)", "momentum")


def check_plain(module: nn.Module, method: str, why: str = "trains the shared network") -> None:
    """Refuse networks a method cannot serve exactly, before anything is trained: BatchNorm statistics
    would have to be kept per task (or versioned with the backbone), which its artifact does not carry."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        raise MaskbankError(f"method '{method}' {why} and keeps no BatchNorm statistics; "
                            "use an architecture without BatchNorm (e.g. bn: none)")


def load_trainable(module: nn.Module, backbone: Tensors, head: str, generator: torch.Generator) -> dict[str, nn.Parameter]:
    """Copy `backbone` into `module`, give the head a fresh initialisation; return the parameters by name."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, weight in backbone.items():
            params[name].copy_(he_normal(weight, generator) if name == head else weight)
    for param in params.values():
        param.requires_grad_(True)
    return params


class HeadMethod(Method):
    """The whole network trains; each task publishes its head and a new backbone version."""

    backbone_codec = "tensors/v1"
    Config = HeadConfig

    def create_backbone(self, module: nn.Module, generator: torch.Generator) -> Tensors:
        check_plain(module, self.name)
        return he_normal_backbone(module, generator)

    def learn_task(self, module: nn.Module, task: TaskData, generator: torch.Generator, context: TrainingContext) -> TaskArtifact:
        cfg = self.config
        check_plain(module, self.name)
        head = head_name(module)
        params = load_trainable(module, context.backbone, head, generator)
        protect = self.protect(params, head, context)
        fit(module, task, list(params.values()), epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum,
            batch_size=cfg.batch_size, generator=generator, desc=f"task {task.index} ({task.name})", before_step=protect)
        trained = {name: p.detach().clone() for name, p in params.items()}
        state, metrics = self.consolidate(module, trained, head, task, context)
        backbone = {**trained, head: context.backbone[head]}
        return TaskArtifact(parts={"head": {head: trained[head]}}, backbone=backbone, state=state, metrics=metrics)

    def protect(self, params: dict[str, nn.Parameter], head: str, context: TrainingContext) -> Callable[[], None]:
        """A hook run after each backward pass, before the optimiser step."""
        return lambda: None

    def consolidate(self, module: nn.Module, trained: Tensors, head: str, task: TaskData,
                    context: TrainingContext) -> tuple[dict[str, Tensors], dict]:
        """(training state for later tasks, metrics) after learning `task`."""
        return {}, {}


def latest_state(context: TrainingContext, name: str) -> Tensors | None:
    """Training state `name` of the newest published task (the accumulated value), if any."""
    return context.tasks[-1].state.get(name) if context.tasks else None


@register_method
class FineTune(HeadMethod):
    """Fine-tuning (NCL): every task trains the whole network with nothing to protect earlier ones."""

    name = "finetune"
