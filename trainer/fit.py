"""The one training loop the methods share: SGD with momentum, a cosine schedule, one shuffled
pass over the task per epoch, and hooks around each optimiser step for methods that must keep
some weights frozen (zero their gradients before, check they did not move after)."""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from registry.errors import MaskbankError

from .streams import TaskData


DIVERGED_REMEDY = "lower the learning rate (--lr) or the method's penalty or scale"
log = logging.getLogger("maskbank.trainer")


class TrainingDiverged(MaskbankError):
    """The loss stopped being a finite number: the settings are unstable for this task."""


def fit(module: nn.Module, task: TaskData, params: list[torch.Tensor], *, epochs: int, lr: float, momentum: float,
        batch_size: int, generator: torch.Generator, desc: str, weight_decay: float = 0.0,
        before_step: Callable[[], None] = lambda: None, after_step: Callable[[], None] = lambda: None,
        remedy: str = DIVERGED_REMEDY) -> float | None:
    """Train `params` of `module` on `task` (cross-entropy on the task's classes); return the last
    epoch's mean loss, or None when `epochs` is 0. `remedy`: what a divergence's message advises (the
    option of this phase's learning rate)."""
    if epochs == 0:
        return None
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    module.train()
    n = len(task.y_train)
    bar = tqdm(range(epochs), desc=desc, unit="epoch", leave=False, disable=None)  # on a terminal only
    for epoch in bar:
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(module(task.x_train[batch])[:, : task.num_classes], task.y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            before_step()
            optimizer.step()
            after_step()
            check_finite(desc, loss, remedy=remedy)
            total += loss.item() * len(batch)
        check_finite(desc, None, params, remedy)
        schedule.step()
        bar.set_postfix(loss=f"{total / n:.3f}")
        log.debug("%s: epoch %d of %d, loss %.4f", desc, epoch + 1, epochs, total / n)  # a log file's progress
    return total / n


def check_finite(desc: str, loss: torch.Tensor | None, params: list[torch.Tensor] = (),
                 remedy: str = DIVERGED_REMEDY) -> None:
    """TrainingDiverged unless the loss and the trained tensors are finite. Both are needed: an
    edge-popup mask is the top-k of its scores, so NaN scores (a learning rate too large) still
    give a mask and a finite loss, and a mask of nothing learned."""
    if loss is not None and not math.isfinite(loss.item()):
        raise TrainingDiverged(f"{desc}: the training loss became {loss.item()} (diverged); {remedy}")
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise TrainingDiverged(f"{desc}: the trained values are no longer finite numbers (diverged); {remedy}")
